"""Training only some parameters (`examples/sft.py --train-only`, `--train-only-file`): the layers a "foundation"
checkpoint re-initialised, as `tuna2 convert --report --fresh-layers-out FILE` lists them, or any other selection.

A pattern selects a parameter when the parameter's name starts with it (`model.language_model.layers.5.`) or when it
matches the whole name as a regular expression (`flow_head\\.layers\\.[0-3]\\..*`). Names are the model's own
(`Tuna2ForConditionalGeneration.named_parameters()`), before any PEFT wrapping.

- Full fine-tuning: the selected parameters train, every other one is frozen (`requires_grad=False`), so the optimizer
  never sees it and it stays bit for bit as loaded.
- With LoRA: the selected parameters train fully, as PEFT `modules_to_save` (PEFT trains a copy of each of their
  modules and saves it with the adapter), and the LoRA adapters train on the target linears outside the selection
  (`exclude_modules`); the base weights of the rest stay frozen.
"""

import re
from collections.abc import Callable, Iterable
from pathlib import Path

from torch import nn


def read_patterns_file(path: str | Path) -> list[str]:
    """The patterns of a file, one a line; blank lines and `#` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    patterns = [line for line in lines if line]
    if not patterns:
        raise ValueError(f"{path} names no parameters (one name prefix or regular expression a line)")
    return patterns


def parameter_selector(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A predicate on parameter names: true when a pattern is a prefix of the name or fully matches it as a regex."""
    patterns = list(patterns)
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error:
            compiled.append(None)  # a name prefix with regex characters, such as "layers.[5"
    return lambda name: any(
        name.startswith(pattern) or (regex is not None and regex.fullmatch(name))
        for pattern, regex in zip(patterns, compiled)
    )


def select_parameters(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """The names of the parameters the patterns select; raises a `ValueError` naming any pattern that selects none
    (a typo would otherwise train nothing)."""
    patterns = list(patterns)
    names = [name for name, _ in model.named_parameters()]
    unused = [pattern for pattern in patterns if not any(map(parameter_selector([pattern]), names))]
    if unused:
        raise ValueError(f"--train-only: no parameter of the model matches {unused}")
    select = parameter_selector(patterns)
    return [name for name in names if select(name)]


def freeze_all_but(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Makes the selected parameters trainable and freezes all others; returns the names of the trained ones."""
    selected = set(select_parameters(model, patterns))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in selected)
    return [name for name, _ in model.named_parameters() if name in selected]


def modules_to_save(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """The names of the modules that own the selected parameters, for PEFT's `modules_to_save` and `exclude_modules`.
    PEFT trains whole modules, so a module whose parameters are selected only in part is an error."""
    select = parameter_selector(patterns)
    select_parameters(model, patterns)  # every pattern must select something
    owners = []
    for module_name, module in model.named_modules():
        own = [f"{module_name}.{name}" if module_name else name for name, _ in module.named_parameters(recurse=False)]
        chosen = [name for name in own if select(name)]
        if chosen and len(chosen) < len(own):
            missing = sorted(set(own) - set(chosen))
            raise ValueError(f"with LoRA, --train-only selects whole modules: {module_name} also has {missing}")
        if chosen:
            owners.append(module_name)
    return owners


__all__ = ["freeze_all_but", "modules_to_save", "parameter_selector", "read_patterns_file", "select_parameters"]
