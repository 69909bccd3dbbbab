"""The Tuna-2 web app behind `tuna2 app`: ask about an image, generate images and edit one, with one model shared by
the three tabs. It needs Gradio (`pip install "tuna2-hf[app]"`), which only this module imports.

    from diffusers_tuna2 import Tuna2Pipeline
    from diffusers_tuna2.app import build_app, launch

    launch(build_app(Tuna2Pipeline.from_pretrained("path/to/checkpoint")))
"""

import threading
from pathlib import Path

import gradio as gr
import PIL.Image
import torch
from transformers import TextIteratorStreamer

from diffusers_tuna2 import Tuna2Pipeline, defaults
from diffusers_tuna2.user_inputs import CommandError, first_line, load_image

# Scenes of the shapes demo (`examples/shapes/shapes.py`'s `render`), named colour-shape-position.
EXAMPLES = Path(__file__).parent / "app_examples"
# Every request that runs the model waits for its turn in this one queue slot: the pipeline keeps per-call state (its
# guidance scale, the scheduler's step index), and two requests at once would only share the same CPU or GPU.
MODEL_SLOT = "model"
MAX_IMAGES_PER_PROMPT = 8
IMAGE_HEIGHT = 320  # pixels on the page, whatever the image's size
# The demo draws 48x48 images, which Gradio shows at their own size: scaled up to the frame, without blurring.
CSS = ".sharp img { object-fit: contain !important; image-rendering: pixelated; }"


def input_error(message: str) -> gr.Error:
    """The error shown for bad input; the server's log does not need its traceback."""
    return gr.Error(message, print_exception=False)


def uploaded_image(**options) -> gr.Image:
    """A `gr.Image` whose unreadable uploads fail as a one-line `gr.Error` naming the file. Gradio opens an upload
    before the event's function runs, where a file that is no image would fail with PIL's message about Gradio's
    temporary copy. (A subclass of gr.Image would do the same, but Gradio writes a .pyi stub next to the module of
    every component class it sees.)"""
    image = gr.Image(**options)
    gradio_preprocess = image.preprocess

    def preprocess(payload):
        try:
            return gradio_preprocess(payload)
        except (OSError, PIL.Image.DecompressionBombError) as error:
            name = payload.orig_name or Path(payload.path).name
            raise input_error(f"cannot read image {name}: {first_line(error)}") from None

    image.preprocess = preprocess
    return image


def read_image(path: str | None, missing: str) -> PIL.Image.Image:
    if path is None:
        raise input_error(missing)
    try:
        return load_image(path)
    except CommandError as error:
        raise input_error(str(error)) from None


def required_text(text: str, missing: str) -> str:
    if not text.strip():
        raise input_error(missing)
    return text.strip()


def required_number(value: float | None, name: str) -> int:
    if value is None:
        raise input_error(f"{name} is empty")
    return int(value)


class Tasks:
    """What the tabs run with one pipeline; its `model` and `processor` answer questions. Bad input raises a one-line
    `gr.Error`, which Gradio shows without stopping the app."""

    def __init__(self, pipe: Tuna2Pipeline):
        self.pipe = pipe

    def ask(self, image_path: str | None, question: str, history: list[dict]):
        """Streams the answer to `question`, the chat so far (`history`, Gradio's messages) being about the image."""
        image = read_image(image_path, "Upload an image, or pick one the app drew, to ask about it")
        question = required_text(question, "Write a question")
        # The chat as the processor's template takes it; the image leads the first question.
        messages = [{"role": message["role"], "content": message["content"]} for message in history]
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        messages[0]["content"] = [{"type": "image", "image": image}, *messages[0]["content"]]
        processor, model = self.pipe.processor, self.pipe.model
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(model.device)
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failures = []

        def answer():
            try:
                model.generate(**inputs, streamer=streamer, max_new_tokens=defaults.MAX_NEW_TOKENS, do_sample=False)
            except Exception as error:  # reported after the stream, which must end or the request waits forever
                failures.append(error)
                streamer.end()

        thread = threading.Thread(target=answer)
        thread.start()
        shown = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        try:
            for text in streamer:
                if text:  # the streamer also reports tokens that completed no word
                    shown[-1]["content"] += text
                    yield shown, ""
        finally:
            # Also when the page goes away mid-answer: the model is free for the next request only once this ends.
            thread.join()
        if failures:  # one line on the page; the server's log keeps the traceback
            raise gr.Error(f"answering failed: {first_line(failures[0])}") from failures[0]
        shown[-1]["content"] = shown[-1]["content"].strip()
        yield shown, ""

    def generate(
        self,
        prompt: str,
        negative_prompt: str,
        height: float | None,
        width: float | None,
        steps: float,
        guidance: float,
        seed: float | None,
        image_count: float,
        progress=gr.Progress(),
    ) -> list[tuple[PIL.Image.Image, str]]:
        """`image_count` images of `prompt`, captioned with their seeds: image k is drawn from the noise of seed
        `seed + k`, as by `tuna2 generate --seed <seed + k>`."""
        prompt = required_text(prompt, "Write a prompt")
        first_seed = required_number(seed, "Seed")
        seeds = [first_seed + k for k in range(int(image_count))]
        drawn = self.sample(prompt, None, negative_prompt, height, width, steps, guidance, seeds, progress)
        return [(image, f"seed {seed}") for image, seed in zip(drawn, seeds)]

    def edit(
        self,
        image_path: str | None,
        instruction: str,
        negative_prompt: str,
        height: float | None,
        width: float | None,
        steps: float,
        guidance: float,
        seed: float | None,
        progress=gr.Progress(),
    ) -> PIL.Image.Image:
        source = read_image(image_path, "Upload an image to edit, or pick one the app drew")
        instruction = required_text(instruction, "Write an instruction")
        seeds = [required_number(seed, "Seed")]
        return self.sample(instruction, source, negative_prompt, height, width, steps, guidance, seeds, progress)[0]

    def sample(self, prompt, source, negative_prompt, height, width, steps, guidance, seeds, progress):
        steps = int(steps)
        height, width = required_number(height, "Height"), required_number(width, "Width")

        def follow(pipe, step, timestep, callback_kwargs):
            progress((step + 1, steps), desc="Denoising", unit="steps")
            return callback_kwargs

        try:
            return self.pipe(
                prompt,
                image=source,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images_per_prompt=len(seeds),
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],  # CPU noise, as the CLI
                callback_on_step_end=follow,
            ).images
        except ValueError as error:  # the pipeline's checks: size, steps, guidance
            raise input_error(first_line(error)) from None
        except Exception as error:  # one line on the page; the server's log keeps the traceback
            raise gr.Error(f"drawing failed: {first_line(error)}") from error


def sampling_settings(pipe: Tuna2Pipeline, editing: bool) -> list[gr.components.Component]:
    """Negative prompt, height, width, steps, guidance and seed, with the checkpoint's defaults (its
    `model_index.json`, else the official ones) as `tuna2 generate` and `tuna2 edit` take them."""
    config = pipe.config
    default_height, default_width = pipe.image_size()
    patch_size = pipe.model.config.patch_size
    with gr.Accordion("Settings", open=False):
        negative_prompt = gr.Textbox(
            config.edit_negative_prompt if editing else config.negative_prompt,
            label="Negative prompt",
            lines=2,
            max_lines=6,
        )
        with gr.Row():
            height = gr.Number(default_height, label="Height", precision=0, minimum=patch_size, step=patch_size)
            width = gr.Number(default_width, label="Width", precision=0, minimum=patch_size, step=patch_size)
            seed = gr.Number(0, label="Seed", precision=0, minimum=0)
        steps = gr.Slider(1, 100, defaults.NUM_INFERENCE_STEPS, step=1, label="Steps")
        guidance = gr.Slider(
            0,
            10,
            config.edit_guidance_scale if editing else config.guidance_scale,
            step=0.1,
            label="Guidance scale (1: off)",
        )
    return [negative_prompt, height, width, steps, guidance, seed]


def example_image(name: str) -> str:
    return str(EXAMPLES / f"{name}.png")


def build_app(pipe: Tuna2Pipeline) -> gr.Blocks:
    """The app's page, on `pipe` (and its `model` and `processor` for the Ask tab). Serve it with `launch`."""
    tasks = Tasks(pipe)
    # A local app: no usage reports to Gradio's servers.
    with gr.Blocks(title="Tuna-2", analytics_enabled=False) as app:
        gr.Markdown(f"# Tuna-2\nModel: `{pipe.model.name_or_path}`")
        with gr.Tabs() as tabs:
            with gr.Tab("Ask", id="ask"):
                with gr.Row():
                    ask_image = uploaded_image(
                        label="Image", type="filepath", height=IMAGE_HEIGHT, elem_classes="sharp"
                    )
                    with gr.Column():
                        chat = gr.Chatbot(label="Chat", height=IMAGE_HEIGHT)
                        question = gr.Textbox(label="Question", placeholder="What colour is the shape?")
                        with gr.Row():
                            ask_button = gr.Button("Ask", variant="primary")
                            gr.ClearButton([question, chat])
                gr.Examples(
                    [
                        [example_image("red-circle-right"), "What colour is the shape?"],
                        [example_image("blue-square-center"), "Where is the shape?"],
                        [example_image("green-triangle-left"), "What shape is it?"],
                    ],
                    [ask_image, question],
                )

            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", placeholder="a red circle on the right")
                        image_count = gr.Slider(
                            1, MAX_IMAGES_PER_PROMPT, 1, step=1, label="Images (seeds seed, seed+1...)"
                        )
                        generate_settings = sampling_settings(pipe, editing=False)
                        generate_button = gr.Button("Generate", variant="primary")
                        gr.Examples(
                            [
                                ["a red circle on the right"],
                                ["a blue square in the center"],
                                ["a green triangle on the left"],
                                ["a yellow circle on the top"],
                            ],
                            [prompt],
                        )
                    with gr.Column():
                        gallery = gr.Gallery(
                            label="Images",
                            type="filepath",
                            format="png",
                            columns=4,
                            elem_id="generated",
                            elem_classes="sharp",
                        )
                        picked = gr.State(0)  # the index of the image the buttons below send
                        with gr.Row():
                            ask_generated = gr.Button("Ask about this image", size="sm")
                            edit_generated = gr.Button("Edit this image", size="sm")

            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    source = uploaded_image(label="Source", type="filepath", height=IMAGE_HEIGHT, elem_classes="sharp")
                    result = gr.Image(
                        label="Result", type="filepath", format="png", height=IMAGE_HEIGHT, elem_classes="sharp"
                    )
                with gr.Row():
                    instruction = gr.Textbox(label="Instruction", placeholder="make the circle blue", scale=3)
                    edit_button = gr.Button("Edit", variant="primary")
                with gr.Row():
                    ask_result = gr.Button("Ask about the result", size="sm")
                    edit_result = gr.Button("Edit the result further", size="sm")
                edit_settings = sampling_settings(pipe, editing=True)
                gr.Examples(
                    [
                        [example_image("red-circle-right"), "make the circle blue"],
                        [example_image("blue-square-center"), "turn the square into a circle"],
                        [example_image("red-circle-right"), "move the circle to the left"],
                    ],
                    [source, instruction],
                )

        model_events = {"concurrency_id": MODEL_SLOT, "concurrency_limit": 1}
        gr.on(
            [ask_button.click, question.submit],
            tasks.ask,
            [ask_image, question, chat],
            [chat, question],
            api_name="ask",
            **model_events,
        )
        # A new image starts a new chat: the answers so far were about the previous one.
        ask_image.change(lambda: [], None, chat, queue=False, api_visibility="private")
        gr.on(
            [generate_button.click, prompt.submit],
            tasks.generate,
            [prompt, *generate_settings, image_count],
            gallery,
            api_name="generate",
            **model_events,
        ).success(lambda: 0, None, picked, queue=False, api_visibility="private")
        gr.on(
            [edit_button.click, instruction.submit],
            tasks.edit,
            [source, instruction, *edit_settings],
            result,
            api_name="edit",
            **model_events,
        )

        def pick(event: gr.SelectData) -> int:
            return event.index

        def send_generated(drawn: list | None, index: int, tab: str):
            if not drawn:
                raise input_error("Generate an image first")
            return drawn[index][0], gr.Tabs(selected=tab)

        def send_result(image: str | None, tab: str):
            if image is None:
                raise input_error("Edit an image first")
            return image, gr.Tabs(selected=tab)

        gallery.select(pick, None, picked, queue=False, api_visibility="private")
        private = {"queue": False, "api_visibility": "private"}
        ask_generated.click(lambda d, i: send_generated(d, i, "ask"), [gallery, picked], [ask_image, tabs], **private)
        edit_generated.click(lambda d, i: send_generated(d, i, "edit"), [gallery, picked], [source, tabs], **private)
        ask_result.click(lambda image: send_result(image, "ask"), result, [ask_image, tabs], **private)
        edit_result.click(lambda image: send_result(image, "edit"), result, [source, tabs], **private)
    return app


def launch(app: gr.Blocks, port: int | None = None, share: bool = False, prevent_thread_lock: bool = False):
    """Serves `app` on `port` (7860, or the next free one, when None), through Gradio's queue; blocks until
    interrupted unless `prevent_thread_lock`. Errors the app did not expect are shown on the page, not just logged."""
    app.queue().launch(
        server_port=port, share=share, prevent_thread_lock=prevent_thread_lock, show_error=True, css=CSS
    )
