"""The configuration reference (``docs/configuration.md``), generated from the schemas in ``lit_hsa/config.py``
and ``lit_hsa/model/config.py``.

    python -m lit_hsa.config_reference > docs/configuration.md

One table per config section, fields in declaration order: key | default | meaning. The meaning is the field's
trailing ``# comment`` in its source (or, when the line has none, the comment lines right above it);
the default is read from an instance, so ``field(default_factory=...)`` shows its actual value. Then the named
presets: their description (the comment above each in ``PRESETS``), parameter counts computed on the meta device,
and every model key on which a preset differs from the schema's default. ``tests/test_docs.py`` fails when the
committed file and this output differ.
"""
from __future__ import annotations

import inspect
import io
import tokenize
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from lit_hsa.config import (
    PRESETS,
    Config,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    OptimConfig,
    SourceConfig,
    TrainerConfig,
)
from lit_hsa.model import config as model_config_module

REGENERATE = "python -m lit_hsa.config_reference > docs/configuration.md"

# (heading, key prefix, schema); the top-level section lists only Config's plain (non-section) keys.
SECTIONS: tuple[tuple[str, str, type], ...] = (
    ("model", "model.", ModelConfig),
    ("data", "data.", DataConfig),
    ("data.sources[i]", "data.sources[i].", SourceConfig),
    ("optim", "optim.", OptimConfig),
    ("trainer", "trainer.", TrainerConfig),
    ("finetune", "finetune.", FinetuneConfig),
    ("top-level keys", "", Config),
)


def field_comments(cls: type) -> dict[str, str]:
    """``{field name: comment}`` for the fields declared in ``cls``'s body: the comment ending the field's
    statement, else the comment lines right above it (section rulers such as ``# --- HSA ---`` excluded)."""
    source = _dedent(inspect.getsource(cls))
    comments: dict[str, str] = {}
    above: list[str] = []  # comment lines since the last statement
    depth = 0  # indentation level: 1 = the class body
    statement: list[tokenize.TokenInfo] = []
    trailing: list[str] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if statement:
                trailing.append(text)
            elif not text.startswith("---"):
                above.append(text)
        elif tok.type == tokenize.NEWLINE:  # end of a logical line (a statement)
            names = [t for t in statement if t.type not in (tokenize.NL, tokenize.COMMENT)]
            if depth == 1 and len(names) > 1 and names[0].type == tokenize.NAME and names[1].string == ":":
                comments[names[0].string] = " ".join(trailing) or " ".join(above)
            statement, trailing, above = [], [], []
        elif tok.type != tokenize.NL:
            statement.append(tok)
    return comments


def _dedent(source: str) -> str:
    lines = source.splitlines()
    indent = len(lines[0]) - len(lines[0].lstrip())
    return "\n".join(line[indent:] for line in lines) + "\n"


def preset_descriptions() -> dict[str, str]:
    """``{preset name: the comment lines above its entry in PRESETS}`` from ``lit_hsa/model/config.py``'s source."""
    lines = inspect.getsource(model_config_module).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("PRESETS"))
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("}"):
            break
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        for name in PRESETS:
            if stripped.startswith(f'"{name}":'):
                out[name] = " ".join(above)
        above = []
    return out


def format_value(value: Any) -> str:
    """A default as it would be written in YAML (null, true, lists in flow style; dataclass items by the keys
    that differ from their own defaults)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if is_dataclass(value):
        items = []
        for f in fields(value):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            if getattr(value, f.name) != default:
                items.append(f"{f.name}: {format_value(getattr(value, f.name))}")
        return "{" + ", ".join(items) + "}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(cls.__name__ + "("):  # dataclass's generated signature, not a docstring
        return ""
    return " ".join(inspect.cleandoc(doc).split()).replace("``", "`")


def section_table(prefix: str, cls: type) -> list[str]:
    instance = cls()
    comments = field_comments(cls)
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in fields(cls):
        value = getattr(instance, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            continue  # a section of its own
        rows.append(f"| `{prefix}{f.name}` | `{_cell(format_value(value))}` | {_cell(comments.get(f.name, ''))} |")
    return rows


def _count(n: float) -> str:
    """Three significant digits: 1.31M, 132M, 1.06B."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def preset_tables() -> list[str]:
    import torch

    from lit_hsa.model.transformer import HSATransformer  # lazily: the model is only needed for the parameter counts

    descriptions = preset_descriptions()
    out = ["| preset | total parameters | active per token | description |", "|---|---|---|---|"]
    for name in PRESETS:
        cfg = ModelConfig.from_name(name)
        with torch.device("meta"):
            model = HSATransformer(ModelConfig.from_name(name, vocab_size=cfg.vocab_size or 320))
        total, active = model.num_parameters()
        out.append(f"| `{name}` | {_count(total)} | {_count(active)} | {_cell(descriptions.get(name, ''))} |")
    default = ModelConfig()
    differing = [f.name for f in fields(ModelConfig) if f.name != "name"
                 and any(getattr(p, f.name) != getattr(default, f.name) for p in PRESETS.values())]
    out += ["", "Model keys on which a preset differs from the schema default:", "",
            "| key | default | " + " | ".join(f"`{n}`" for n in PRESETS) + " |",
            "|---|---|" + "---|" * len(PRESETS)]
    for key in differing:
        cells = [format_value(getattr(default, key))] + [format_value(getattr(p, key)) for p in PRESETS.values()]
        out.append(f"| `model.{key}` | " + " | ".join(cells) + " |")
    return out


def reference_markdown() -> str:
    """The whole of ``docs/configuration.md``."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from lit_hsa/config.py, lit_hsa/model/config.py by `{REGENERATE}`; do not edit. -->",
        "",
        "A run's config is a YAML file merged onto these schemas (`lit_hsa/config.py`), then `dotted.key=value`",
        "overrides from the command line; an unknown key or a wrong type fails at start-up naming the key.",
        "`model.name` picks a preset (below) and the other `model.*` keys override it, so the model defaults shown",
        "here are the schema's, which a preset replaces. The resolved config is saved as `config.yaml` in each run.",
        "",
    ]
    for heading, prefix, cls in SECTIONS:
        out += [f"## {heading}", ""]
        doc = _doc(cls)
        if doc and cls is not Config:
            out += [doc, ""]
        out += section_table(prefix, cls) + [""]
    out += ["## Model presets", "",
            "`ModelConfig.from_name(name)`; parameters counted on the meta device with the preset's vocabulary "
            "(`tiny`: 320, the byte tokenizer's 258 symbols padded to a multiple of 64); tied embeddings count once, "
            "routed experts count k/E of their weights as active.", ""]
    out += preset_tables()
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
