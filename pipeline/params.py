"""Reading ``params.yaml``: one top-level section per stage, each validated by a pydantic model.

Stages call :func:`load_section` with their section name; the model is looked up in
:data:`SECTION_MODELS` (other stages add theirs with :func:`register_section`, or pass ``model=``).
Every problem (missing file, bad YAML, a missing section, a validation error) raises one
:class:`ParamsError` that names the file, the section and the offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.data import DATASETS, known_datasets
from pipeline.data import synthetic as _synthetic
from pipeline.data.tokenize import DEFAULT_READ_LENGTH, DEFAULT_WRITE_LENGTH


class ParamsError(Exception):
    """A params file that cannot be used, with a message naming the file, section and key."""


# ---------------------------------------------------------------------------------------------
# the `prepare` section
# ---------------------------------------------------------------------------------------------
class DatasetEntry(BaseModel):
    """One data set to prepare (an item of ``prepare.datasets``).

    Attributes:
        name: reader name (``synthetic``, ``locomo``, ``qasper``, ``hotpotqa``, ``memoryagentbench``,
            ``ifeval``, ``gpqa``).
        out: output folder name under ``out_dir`` (default: ``name``; set it to prepare one reader twice).
        enabled: false skips the entry.
        source: local file or folder (relative to the params file; ``$VARS`` and ``~`` expanded),
            ``hf`` (the data set's usual hub id) or ``hf:<owner>/<name>``. Not used by ``synthetic``.
        splits: splits to write (default: the reader's usual splits; for ``synthetic`` the keys of
            ``synthetic.dialogues``).
        files: explicit ``split → file`` map, relative to a source folder.
        hf_config / revision: hub configuration and revision (pin one for reproducibility).
        limit: keep at most this many examples per split (native order).
        options: reader options (see each reader's ``parse`` docstring).
        synthetic: generator settings (:class:`pipeline.data.synthetic.SyntheticConfig` fields).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    out: str | None = None
    enabled: bool = True
    source: str | None = None
    splits: list[str] | None = None
    files: dict[str, str] | None = None
    hf_config: str | None = None
    revision: str | None = None
    limit: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)
    synthetic: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; known datasets: {', '.join(known_datasets())}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DatasetEntry:
        if self.name == "synthetic":
            try:
                cfg = _synthetic.config_from_options(self.synthetic or {})
            except (TypeError, ValueError) as err:
                raise ValueError(f"synthetic: {err}") from None
            missing = [s for s in self.splits or [] if s not in cfg.dialogues]
            if missing:
                raise ValueError(f"splits {missing} have no count in synthetic.dialogues")
        elif self.synthetic is not None:
            raise ValueError("'synthetic' settings are only for the synthetic dataset")
        elif self.enabled and not self.source:
            raise ValueError(f"dataset {self.name!r} needs a source (local path, 'hf' or 'hf:<id>')")
        if self.splits is not None and len(set(self.splits)) != len(self.splits):
            raise ValueError("splits are listed twice")
        return self

    @property
    def out_name(self) -> str:
        """The output folder name."""
        return self.out or self.name

    def split_names(self) -> list[str]:
        """The splits to write."""
        if self.splits:
            return list(self.splits)
        if self.name == "synthetic":
            return _synthetic.ordered_splits(_synthetic.config_from_options(self.synthetic or {}).dialogues)
        return list(DATASETS[self.name].default_splits)

    def reader_options(self) -> dict[str, Any]:
        """Options passed to the reader (the synthetic settings for the generator)."""
        return dict(self.synthetic or {}) if self.name == "synthetic" else dict(self.options)


class TokenizerEntry(BaseModel):
    """Optional tokenizer for token-length statistics in the manifest.

    Attributes:
        name_or_path: ``embedded`` (offline SmolLM2-135M) or a local folder / hub id.
        gguf_file: GGUF file name inside ``name_or_path`` when the tokenizer comes from one.
        write_length / read_length: the lengths the statistics report overflow against.
    """

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = "embedded"
    gguf_file: str | None = None
    write_length: int = Field(default=DEFAULT_WRITE_LENGTH, ge=1)
    read_length: int = Field(default=DEFAULT_READ_LENGTH, ge=1)


class PrepareParams(BaseModel):
    """The ``prepare`` section: which data sets to prepare and where to write them."""

    model_config = ConfigDict(extra="forbid")

    out_dir: str = "data/prepared"
    datasets: list[DatasetEntry]
    tokenizer: TokenizerEntry | None = None

    @model_validator(mode="after")
    def _unique_outputs(self) -> PrepareParams:
        names = [d.out_name for d in self.datasets if d.enabled]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two enabled datasets write to the same folder {dup}; set 'out' on one of them")
        if not names:
            raise ValueError("no enabled datasets")
        return self


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
SECTION_MODELS: dict[str, type[BaseModel]] = {"prepare": PrepareParams}


def register_section(name: str, model: type[BaseModel]) -> None:
    """Declare the pydantic model of another stage's section."""
    SECTION_MODELS[name] = model


def load_params(path: str | Path) -> dict[str, Any]:
    """The whole params file as a dict (raises :class:`ParamsError` for a missing file or bad YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:  # a directory, no permission, a symlink loop: the OS's reason, not a traceback
        raise ParamsError(f"{path}: cannot read the params file: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: invalid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: the problem and where (PyYAML's own text quotes the offending line, which may be huge)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_section(path: str | Path, section: str, model: type[BaseModel] | None = None) -> Any:
    """Section ``section`` of the params file, validated by ``model`` (default: the registered one).

    Returns the model instance, or the raw value when no model is known. ``evaluate.variants: all``
    stands for every key of ``train.variants`` (so adding a trained variant is one line).
    """
    data = load_params(path)
    if section == "evaluate" and isinstance(data.get("evaluate"), dict) and data["evaluate"].get("variants") == "all":
        trained = (data.get("train") or {}).get("variants") if isinstance(data.get("train"), dict) else None
        if not isinstance(trained, dict) or not trained:
            raise ParamsError(f"{path}: evaluate.variants is 'all' but train.variants lists no variant")
        data["evaluate"] = {**data["evaluate"], "variants": list(trained)}
    if section not in data:
        raise ParamsError(f"{path}: no '{section}' section (sections: {', '.join(map(str, data)) or 'none'})")
    model = model or SECTION_MODELS.get(section)
    if model is None:
        return data[section]
    try:
        return model.model_validate(data[section])
    except ValidationError as err:
        raise ParamsError(f"{path}: section '{section}': {_describe(err)}") from None
