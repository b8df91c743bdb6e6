"""Export a trained module in the formats users load: a Hugging Face peft adapter, or ONNX.

Only LoRA modules are exported: peft has no format for this project's bottleneck adapters and soft
prompts, and merging into the base weights is defined for LoRA alone; other kinds raise
:class:`~edge_runtime.errors.ConfigError` naming what is supported.

The classifier being exported
-----------------------------
FedPEFT+ classifies with the base encoder (``transformers.AutoModel``, e.g. ``BertModel``, no task
head) adapted by the LoRA module, then

    logits = head(normalize(mean of last_hidden_state over attention_mask))

(:class:`~edge_runtime.engines.torch_engine.TextClassifier`): masked mean pooling, L2
normalisation, a linear head whose rows carry the cosine head's scale. Decoders (the ``llama``
family) pool by their last real token instead of the mean, as the engine trains them; the manifest's
``classifier`` line says which. For a decoder's ONNX graph the causal and padding mask goes in as
one additive 4-D tensor, since transformers' own causal-mask code does not trace. This is not peft's or
transformers' sequence-classification head (a pooler on the first token), so the head travels in a
file of its own rather than as a ``modules_to_save`` entry of a model class users would not have.

``--format peft`` (:func:`export_peft`) writes a folder with

- ``adapter_config.json`` and ``adapter_model.safetensors``, written by peft's own
  ``PeftModel.save_pretrained``: a LoRA adapter for the base encoder. The project's tensor
  ``encoder.<module path>.lora_A`` (rank x in) is peft's ``base_model.model.<module path>.lora_A.weight``
  and ``lora_B`` (out x rank) likewise, same orientation; ``r``, ``lora_alpha`` (the update is
  alpha / r B A) and ``target_modules`` are the module's ``LoraSpec``'s. ``base_model_name_or_path``
  is the hub id for the bundled MiniLM (``sentence-transformers/all-MiniLM-L6-v2``), else the
  model's name or path as the run had it;
- ``head.safetensors``: ``weight`` (labels x hidden) and ``bias`` (labels) of the head;
- the base model's tokenizer files, and ``fedpeft_export.json``: the training configuration,
  where the module came from and the line above.

:func:`load_exported` rebuilds the classifier from that folder: the base encoder (eager attention,
as the engine runs it), ``PeftModel.from_pretrained`` on it, and the head. Its logits equal the
torch engine's for the same module (``tests/test_export.py`` checks the bundled MiniLM with
``torch.equal``). Without FedPEFT+, ``PeftModel.from_pretrained(AutoModel.from_pretrained(base),
folder)`` gives the adapted encoder; the pooling and head above turn its output into the logits.

``--format onnx`` (:func:`export_onnx`) writes ``model.onnx``: the LoRA update merged into the base
weights (peft's ``merge_and_unload`` with ``safe_merge``), the pooling, normalisation and head
included. optimum is not a dependency of this project; the graph comes from ``torch.onnx.export``
(the TorchScript exporter, opset 17). Inputs ``input_ids`` and ``attention_mask`` (int64, batch x
sequence, both dynamic); outputs ``logits`` (batch x labels) and ``features`` (batch x hidden, the
unit-norm pooled features). Before the folder is written, the graph runs in an onnxruntime
``InferenceSession`` on :data:`PROBE_TEXTS` (another batch size and length than it was traced with)
and its logits are compared with the unmerged torch model's: a largest absolute difference above
:data:`ONNX_TOLERANCE` fails the export, and the measured one goes into ``fedpeft_export.json``.
The folder also holds the tokenizer files.

Image classifiers and question answering
----------------------------------------
A ViT module (a model folder of the ``vit`` family) exports with ``--format onnx`` as
``logits = head(normalize(class token's last hidden state))``
(:class:`~edge_runtime.engines.torch_engine.ImageClassifier`), LoRA merged the same way. Input
``pixel_values`` (float32, batch x channels x image_size x image_size, batch dynamic), already
preprocessed as the torch engine does it (resized bilinearly with antialiasing, scaled to [0, 1],
normalised with the model folder's ``image_mean`` and ``image_std``; the manifest's
``preprocessing`` records them); outputs ``logits`` and ``features``. The check runs
:data:`PROBE_IMAGES` seeded random images of assorted sizes through both models.

A question answering module (``TrainConfig.task == "question-answering"``) exports as its
:class:`~edge_runtime.engines.torch_engine.SpanExtractor`: inputs ``input_ids``,
``attention_mask`` and, for models with two segment embeddings (BERT), ``token_type_ids`` (int64,
batch x sequence, dynamic); outputs ``start_logits`` and ``end_logits`` (batch x sequence, raw:
padding is not masked). The answer is the best span of context tokens
(:func:`edge_runtime.qa_eval.best_span`). The check runs :data:`PROBE_QUESTIONS`; the tokenizer
files go beside the graph. Both compare every output with the unmerged torch model within
:data:`ONNX_TOLERANCE`. ``--format peft`` writes both as it writes a text classifier (adapter,
``head.safetensors``, the manifest with ``task``; the image model's manifest has
``preprocessing`` and no tokenizer files, the span model's ``segments`` and ``seq_len``), and
:func:`load_exported` rebuilds the :class:`~edge_runtime.engines.torch_engine.ImageClassifier` or
:class:`~edge_runtime.engines.torch_engine.SpanExtractor` by the manifest's ``task``.

CLIP and causal LMs
-------------------
An image-text matching module (CLIP) has no head of ours: ``--format peft`` writes the adapter for
``CLIPModel`` and a manifest with ``preprocessing``, ``seq_len`` and ``logit_scale``; ``--format
onnx`` writes one graph a tower (:data:`TEXT_TOWER_NAME`: ``input_ids``, ``attention_mask`` ->
unit-norm ``text_embeds``; :data:`IMAGE_TOWER_NAME`: ``pixel_values`` -> unit-norm
``image_embeds``). A causal-LM module is an adapter for the decoder with its own LM head
(``task_type`` ``CAUSAL_LM``: peft's ``PeftModel.from_pretrained`` on ``AutoModelForCausalLM``
loads it as it is), or ``model.onnx`` with next-token ``logits`` at every position.

Where modules come from (:func:`read_module`)
---------------------------------------------
- a service's state folder (``fedpeft serve --state DIR``: ``DIR/state.sqlite``): the latest
  checkpointed global module and the fleet's training configuration. With ``--device``, the module
  that device trains: its cluster's (``--clusters``) or, in a mixed fleet, its assigned
  configuration's view of the global state. The service never holds personalized modules.
- a device's state folder (``fedpeft edge --state DIR`` or ``EdgeClient(state_dir=DIR)``):
  ``DIR/modules/`` (:mod:`edge_runtime.module_store`), the final global module and, when the
  service ran a personalization phase, the device's personalized one (taken by default).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime import wire
from edge_runtime.config import TrainConfig
from edge_runtime.errors import ConfigError, EngineError, FedPeftError, NonFinite, ShapeMismatch
from edge_runtime.families import ITM_TASK, LM_TASK, QA_TASK, family_of, family_of_dir
from edge_runtime.models import hub_name, resolve_model
from edge_runtime.module_store import GLOBAL_MODULE, PERSONAL_MODULE, ModuleStore
from edge_runtime.peft_specs import LoraSpec

if TYPE_CHECKING:
    import torch

    from edge_runtime.engines.torch_engine import (
        CausalLM,
        ImageClassifier,
        ImageTextMatcher,
        SpanExtractor,
        TextClassifier,
    )

EXPORT_FORMATS = ("peft", "onnx")
MODULE_CHOICES = ("auto", GLOBAL_MODULE, PERSONAL_MODULE)
EXPORT_VERSION = 1
MANIFEST_NAME = "fedpeft_export.json"
HEAD_NAME = "head.safetensors"
ONNX_NAME = "model.onnx"
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4  # largest absolute logit difference between onnxruntime and torch
SERVICE_DB = "state.sqlite"
DEVICE_MODULES = "modules"
CLASSIFIER = "logits = head(normalize(mean of last_hidden_state over attention_mask))"
# decoders (the llama family) read the last real token instead of the mean; see classifier_line()
POOLED_BY = {
    "mean": "mean of last_hidden_state over attention_mask",
    "last_token": "last_hidden_state at each row's last real token (rows padded on the right)",
}


def classifier_line(pooling: str) -> str:
    """The manifest's one-line description of a text classifier that pools by ``pooling``."""
    return f"logits = head(normalize({POOLED_BY[pooling]}))"


PROBE_TEXTS = (
    "A short one.",
    "The striker scored twice before half time and the league title is within reach.",
    "Shares fell sharply after the bank reported lower earnings than investors expected this quarter.",
    "The telescope photographed a galaxy far beyond the orbit of any planet we know, and the launch "
    "of the next rocket is planned for the spring, weather permitting.",
    "ok",
)
_TRACE_TEXTS = ("a sample", "another sample text")
IMAGE_CLASSIFIER = "logits = head(normalize(last_hidden_state[:, 0]))  (the class token)"
IMAGE_TEXT_MATCHER = (
    "logits = logit_scale * normalize(text projection) @ normalize(image projection).T  (CLIP)"
)
CAUSAL_LM = (
    "logits = lm_head(last_hidden_state)  (next-token logits at every position; the decoder's own head)"
)
SPAN_EXTRACTOR = "start_logits, end_logits = head(last_hidden_state).unbind(-1)  (per token)"
PROBE_QUESTIONS = (
    ("Who scored twice?", "The striker scored twice before half time and the coach was pleased."),
    ("What fell?", "Shares fell sharply after the bank reported lower earnings than expected."),
    ("Where did the rocket go?", "The rocket went to the moon."),
    ("When is the next launch planned?", "The next launch is planned for the spring, weather permitting."),
    ("What?", "ok"),
)
_TRACE_QUESTIONS = (("a question?", "a context"), ("another question?", "another, longer context here"))
PROBE_IMAGES = 5  # seeded random images of assorted sizes the ONNX image model is checked on
_LORA_NAME = re.compile(r"^encoder\.(?P<path>.+)\.(?P<factor>lora_[AB])$")
_PEFT_PARAM = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<factor>lora_[AB])\.[^.]+\.weight$")
_HEAD = ("head.weight", "head.bias")
HEADLESS_TASKS = (ITM_TASK, LM_TASK)  # no head of ours: CLIP's projections, the decoder's own LM head


@dataclass(frozen=True)
class ModuleSource:
    """A trained module, the training configuration it belongs to, and where it came from."""

    tensors: dict[str, np.ndarray]
    config: TrainConfig
    origin: str = field(metadata={"help": "what the module is, for messages and the manifest"})
    union: bool = field(
        default=False,
        metadata={
            "help": "a mixed fleet's global state: the module is the leading corner of each tensor "
            "its configuration trains (broker_server.heterogeneous.view)"
        },
    )


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    out: Path
    format: str
    origin: str
    tensors: int
    max_abs_diff: float | None = field(
        default=None, metadata={"help": "onnx: largest |onnxruntime - torch| logit on PROBE_TEXTS"}
    )


@dataclass
class ExportedModel:
    """What :func:`load_exported` returns: the rebuilt classifier, its tokenizer and the manifest.

    A text classifier's ``model(input_ids, attention_mask)`` gives the logits (:meth:`logits`
    tokenizes for it); an image classifier's ``model(pixel_values)`` (:meth:`image_logits`
    preprocesses for it); a question answering model's ``model(input_ids, attention_mask[,
    token_type_ids])`` the start and end logits (:meth:`span_logits`); CLIP's matcher its unit-norm
    :meth:`text_embeddings` and :meth:`image_embeddings`; a causal LM's ``model(input_ids,
    attention_mask)`` the next-token logits (:meth:`next_token_logits`). ``model.encoder`` is the
    ``PeftModel``, and ``model.head`` the head where the task has one of ours (not CLIP, not a
    causal LM). ``tokenizer`` is None for an image model.
    """

    model: TextClassifier | ImageClassifier | SpanExtractor | ImageTextMatcher | CausalLM
    tokenizer: Any
    manifest: dict[str, Any]

    @property
    def task(self) -> str:
        return str(self.manifest.get("task", "classification"))

    def _want(self, task: str, call: str, *also: str) -> None:
        if self.task not in (task, *also):
            raise ConfigError(f"{call} is for {' and '.join((task, *also))} exports; this one is {self.task}")

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask as the engines make them (truncated at the run's seq_len)."""
        self._want("classification", "encode", ITM_TASK, LM_TASK)
        return _encode(self.tokenizer, texts, int(self.manifest["seq_len"]))

    def next_token_logits(self, texts: Sequence[str]) -> torch.Tensor:
        """A causal LM's logits over the vocabulary at every position (``texts x tokens x vocab``)."""
        import torch

        self._want(LM_TASK, "next_token_logits")
        input_ids, mask = self.encode(texts)
        with torch.no_grad():
            logits: torch.Tensor = self.model(input_ids, mask)
        return logits

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP's unit-norm caption embeddings."""
        import torch

        self._want(ITM_TASK, "text_embeddings")
        input_ids, mask = self.encode(texts)
        with torch.no_grad():
            matcher: Any = self.model
            out: torch.Tensor = matcher.text_embeddings(input_ids, mask)
        return out

    def image_embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """CLIP's unit-norm image embeddings."""
        import torch

        self._want(ITM_TASK, "image_embeddings")
        pixels = self.pixels(images)
        with torch.no_grad():
            matcher: Any = self.model
            out: torch.Tensor = matcher.image_embeddings(pixels)
        return out

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """Class logits of ``texts``."""
        import torch

        self._want("classification", "logits")
        input_ids, mask = self.encode(texts)
        with torch.no_grad():
            logits: torch.Tensor = self.model(input_ids, mask)
        return logits

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``pixel_values`` of ``images`` (H x W x 3 uint8 arrays), preprocessed as the manifest says."""
        import torch

        from edge_runtime.engines.torch_engine import pixel_values

        self._want("image-classification", "pixels", ITM_TASK)
        pre = self.manifest["preprocessing"]
        shape = (int(pre["channels"]), 1, 1)
        mean = torch.tensor(pre["image_mean"], dtype=torch.float32).reshape(shape)
        std = torch.tensor(pre["image_std"], dtype=torch.float32).reshape(shape)
        return pixel_values(list(images), int(pre["image_size"]), int(pre["channels"]), mean, std)

    def image_logits(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Class logits of ``images``."""
        import torch

        self._want("image-classification", "image_logits")
        pixels = self.pixels(images)
        with torch.no_grad():
            logits: torch.Tensor = self.model(pixels)
        return logits

    def span_logits(self, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits of (question, context) pairs, encoded as the engine encodes them."""
        import torch

        self._want(QA_TASK, "span_logits")
        feeds = encode_pairs(
            self.tokenizer, pairs, int(self.manifest["seq_len"]), bool(self.manifest["segments"])
        )
        with torch.no_grad():
            start, end = self.model(*feeds.values())
        return start, end


# --- where modules come from -----------------------------------------------------------------------


def read_module(state: str | Path, *, device: str | None = None, module: str = "auto") -> ModuleSource:
    """The module to export from a service's or a device's state folder (see the module docstring).

    ``module`` is ``global``, ``personal`` or ``auto`` (a device's personalized module when it has
    one, else the global module).
    """
    if module not in MODULE_CHOICES:
        raise ConfigError(f"module must be one of {', '.join(MODULE_CHOICES)}, got {module!r}")
    folder = Path(state).expanduser()
    if not folder.exists():
        raise ConfigError(f"state folder {folder} does not exist")
    if folder.is_file() and folder.suffix == ".sqlite":
        return _read_service(folder, device, module)
    if (folder / SERVICE_DB).is_file():
        return _read_service(folder / SERVICE_DB, device, module)
    if (folder / DEVICE_MODULES).is_dir() or (folder / "outbox").is_dir():
        return _read_device(folder, device, module)
    raise ConfigError(
        f"{folder} is not a FedPEFT+ state folder: it has neither {SERVICE_DB} (fedpeft serve --state) "
        f"nor {DEVICE_MODULES}/ (fedpeft edge --state)"
    )


def _read_device(folder: Path, device: str | None, module: str) -> ModuleSource:
    store = ModuleStore(folder / DEVICE_MODULES)
    kept = store.names()
    if not kept:
        raise ConfigError(
            f"device state folder {folder} holds no trained module: a device writes {DEVICE_MODULES}/ "
            "when the service ends the run"
        )
    name = (PERSONAL_MODULE if PERSONAL_MODULE in kept else GLOBAL_MODULE) if module == "auto" else module
    if name not in kept:
        why = " (the service ran no personalization phase)" if name == PERSONAL_MODULE else ""
        raise ConfigError(
            f"device state folder {folder} has no {name} module{why}; it has: {', '.join(kept)}"
        )
    stored = store.load(name)
    assert stored is not None  # listed just above
    if device is not None and stored.device_id != device:
        raise ConfigError(f"{folder} holds the modules of device {stored.device_id!r}, not of {device!r}")
    what = "personalized module" if name == PERSONAL_MODULE else "final global module"
    return ModuleSource(
        tensors=stored.tensors,
        config=stored.config,
        origin=f"the {what} of device {stored.device_id} (round {stored.round}) from {folder}",
    )


def _read_service(db: Path, device: str | None, module: str) -> ModuleSource:
    from broker_server.clustering import split_state
    from broker_server.state import ASSIGNMENT_KEY, TRAIN_CONFIG_KEY, StateStore

    if module == PERSONAL_MODULE:
        raise ConfigError(
            "a service never holds personalized modules (they stay on the devices): export one from "
            "the device's state folder"
        )
    store = StateStore(db)
    try:
        latest = store.latest_global()
        if latest is None:
            raise ConfigError(f"service state {db} holds no global module yet")
        round_, _, payload = latest
        try:
            checkpoint = wire.decode_global(payload, max_bytes=max(len(payload), wire.DEFAULT_MAX_PAYLOAD))
        except FedPeftError as exc:
            raise ConfigError(
                f"service state {db}: the global module of round {round_} is unreadable: {exc}"
            ) from None
        devices = sorted(store.devices())
        assignments = {d: store.get_meta(ASSIGNMENT_KEY + d) for d in devices}
        assigned = {d: a for d, a in assignments.items() if a is not None}
        fleet_config = store.get_meta(TRAIN_CONFIG_KEY)
        clusters = store.get_meta("clusters")
    finally:
        store.close()
    tensors = dict(checkpoint.tensors)
    clustered = any(name.startswith("cluster") and "/" in name for name in tensors)
    known = ", ".join(devices) or "none"
    if device is None:
        if clustered:
            raise ConfigError(
                f"service state {db} keeps one global module per cluster: pass --device ID (devices: {known})"
            )
        if assigned:
            raise ConfigError(
                f"service state {db} is a mixed fleet's (modules assigned per device): pass --device ID "
                f"(devices: {known})"
            )
        origin = f"the global module of round {round_} from {db}"
        return ModuleSource(tensors, _stored_config(fleet_config, db), origin)
    if device not in devices:
        raise ConfigError(f"unknown device {device!r} in service state {db} (devices: {known})")
    config_data, union = fleet_config, False
    if device in assigned:
        assignment = assigned[device]
        if assignment.get("excluded"):
            raise ConfigError(f"device {device!r} was left out of the run: {assignment['excluded']}")
        config_data, union = assignment.get("config"), True
    what = "global module"
    if clustered:
        members = (clusters or {}).get("members", {})
        if device not in members:
            raise ConfigError(f"device {device!r} is in no cluster of service state {db}")
        cluster = int(members[device])
        tensors = split_state(tensors, len(clusters["centroids"]))[cluster]  # clusters: members above
        what = f"cluster {cluster}'s global module"
    origin = f"the {what} of round {round_} that device {device} trains, from {db}"
    return ModuleSource(tensors, _stored_config(config_data, db), origin, union=union)


def _stored_config(data: Any, db: Path) -> TrainConfig:
    if data is None:
        raise ConfigError(
            f"service state {db} does not record its training configuration (the service of this "
            "version stores it when it starts): run the service again on this state folder to record it"
        )
    return TrainConfig.from_dict(data)


# --- the LoRA module in peft's terms ----------------------------------------------------------------


def lora_spec(config: TrainConfig) -> LoraSpec:
    """The module's LoRA spec; any other kind is refused, naming what is supported."""
    if not isinstance(config.peft, LoraSpec):
        raise ConfigError(
            f"only LoRA modules can be exported (to peft or ONNX); this one is a {config.peft.kind!r} "
            "module (supported: lora)"
        )
    return config.peft


def lora_config(spec: LoraSpec, *, base_model: str | None = None) -> Any:
    """peft's ``LoraConfig`` for ``spec``, as the torch engine builds it (scaling alpha / r)."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft takes floats; its hint says int
        target_modules=list(spec.target_modules),
        lora_dropout=spec.dropout,
        bias="none",
        base_model_name_or_path=base_model,
    )


def peft_key(name: str) -> str:
    """peft's saved key of a module tensor: ``encoder.P.lora_A`` -> ``base_model.model.P.lora_A.weight``.

    ``encoder.`` is the classifier's attribute that holds the base model; peft's key is the path
    inside that base model, behind ``base_model.model.``, with the factor's ``.weight``.
    """
    match = _LORA_NAME.match(name)
    if match is None:
        raise ShapeMismatch(f"{name}: not a LoRA tensor of the encoder (encoder.<module>.lora_A or lora_B)")
    return f"base_model.model.{match['path']}.{match['factor']}.weight"


def module_name(peft_param: str) -> str:
    """The module tensor a ``PeftModel`` parameter holds (``...lora_A.<adapter>.weight``)."""
    match = _PEFT_PARAM.match(peft_param)
    if match is None:
        raise ShapeMismatch(f"{peft_param}: not a LoRA parameter of a PeftModel")
    return f"encoder.{match['path']}.{match['factor']}"


def _module_tensors(
    source: ModuleSource, expected: Mapping[str, tuple[int, ...]], spec: LoraSpec
) -> dict[str, np.ndarray]:
    """The module's tensors by name, exactly the ``expected`` names and shapes (head included)."""
    if source.union:
        from broker_server.heterogeneous import view

        tensors = view(source.tensors, expected)
    else:
        tensors = dict(source.tensors)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ShapeMismatch(
                f"the module does not match LoRA rank {spec.rank} on {', '.join(spec.target_modules)} of "
                f"{source.config.model}: missing {missing[:3]}, unexpected {extra[:3]}"
            )
    out: dict[str, np.ndarray] = {}
    for name, shape in expected.items():
        value = np.asarray(tensors[name], dtype=np.float32)
        if tuple(value.shape) != tuple(shape):
            raise ShapeMismatch(f"{name}: shape {value.shape} != {tuple(shape)}")
        if not np.isfinite(value).all():
            raise NonFinite(f"{name} holds NaN or infinity")
        out[name] = value
    return out


@dataclass
class _Adapted:
    """The classifier with the module (a ``PeftModel`` on the base encoder, and the head)."""

    classifier: Any  # TextClassifier, ImageClassifier or SpanExtractor, by ``task``
    tokenizer: Any  # None for an image model
    spec: LoraSpec
    tensors: int  # module tensors loaded, head included
    task: str
    path: str  # the base model's folder or hub id


def export_task(config: TrainConfig) -> str:
    """What the module's model does: ``classification`` (texts), ``image-classification`` (a ViT
    folder), or ``TrainConfig.task``'s ``question-answering``, ``image-text-matching`` (CLIP) or
    ``causal-lm`` (a decoder with its LM head)."""
    if config.task in HEADLESS_TASKS or config.task == QA_TASK:
        return config.task
    path = resolve_model(config.model)
    if Path(path).is_dir() and "image-classification" in family_of_dir(path).trains:
        return "image-classification"
    return "classification"


def _adapted(source: ModuleSource, threads: int | None) -> _Adapted:
    """Build the base encoder, put the module on it with peft, and add the head."""
    import torch
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from edge_runtime.engines.torch_engine import (
        CausalLM,
        ImageClassifier,
        ImageTextMatcher,
        SpanExtractor,
        TextClassifier,
    )

    spec = lora_spec(source.config)
    hf_logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    path = resolve_model(source.config.model)
    task = export_task(source.config)
    try:
        tokenizer = None if task == "image-classification" else AutoTokenizer.from_pretrained(path)
        loader: Any = AutoModelForCausalLM if task == LM_TASK else AutoModel
        base = loader.from_pretrained(path, attn_implementation="eager")
    except OSError as exc:
        raise EngineError(f"cannot load model {source.config.model!r}: {exc}") from None
    base.requires_grad_(False)
    config = lora_config(spec)
    if task == LM_TASK:
        config.task_type = "CAUSAL_LM"  # so that peft's AutoPeftModelForCausalLM loads the folder too
    try:
        peft_model = get_peft_model(base, config)
    except ValueError as exc:
        raise ConfigError(f"LoRA target modules not found in the model: {exc}") from None
    labels = source.config.num_labels
    expected = {module_name(n): tuple(p.shape) for n, p in peft_model.named_parameters() if ".lora_" in n}
    if task not in HEADLESS_TASKS:
        hidden = int(base.config.hidden_size)
        expected |= {"head.weight": (labels, hidden), "head.bias": (labels,)}
    tensors = _module_tensors(source, expected, spec)
    state = {peft_key(n): torch.from_numpy(v) for n, v in tensors.items() if n not in _HEAD}
    result: Any = set_peft_model_state_dict(peft_model, state)  # torch's load_state_dict result
    if result.unexpected_keys:
        raise ShapeMismatch(f"peft did not take {sorted(result.unexpected_keys)[:3]}")
    peft_model.peft_config["default"].base_model_name_or_path = hub_name(source.config.model)
    classifier: TextClassifier | ImageClassifier | SpanExtractor | ImageTextMatcher | CausalLM
    if task == ITM_TASK:
        classifier = ImageTextMatcher(peft_model)
    elif task == LM_TASK:
        classifier = CausalLM(peft_model)
    elif task == QA_TASK:
        classifier = SpanExtractor(peft_model, hidden)
    elif task == "image-classification":
        classifier = ImageClassifier(peft_model, hidden, labels)
    else:
        classifier = TextClassifier(peft_model, hidden, labels, None, family_of(base.config).pooling)
    if task not in HEADLESS_TASKS:
        head: Any = getattr(classifier, "head")  # noqa: B009  # the headed models' linear head
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(tensors["head.weight"]))
            head.bias.copy_(torch.from_numpy(tensors["head.bias"]))
    classifier.eval()
    return _Adapted(classifier, tokenizer, spec, len(tensors), task, path)


def _causal_mask_encoder(inner: Any) -> Any:
    """``inner``, a decoder, wrapped to take its causal and padding mask as one additive 4-D tensor.

    transformers builds a decoder's causal mask with code the TorchScript tracer cannot follow
    (``torch.onnx.export`` fails with ``unordered_map::at`` on LLaMA); given a 4-D mask it uses it
    as it is. The mask lets each position see itself and the real tokens before it, the mask
    transformers builds from a right-padded ``attention_mask``, so the hidden states at real tokens
    are the unwrapped decoder's.
    """
    import torch
    from torch import nn

    class CausalMaskEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            n = input_ids.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
            blocked = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
            return self.inner(input_ids=input_ids, attention_mask=blocked, use_cache=False)

    return CausalMaskEncoder()


def _encode(tokenizer: Any, texts: Sequence[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask as the torch engine batches them: truncated at ``seq_len``, padded on the right."""
    import torch

    if not texts:
        raise ConfigError("no texts to encode")
    ids: list[list[int]] = tokenizer(list(texts), truncation=True, max_length=seq_len)["input_ids"]
    width = max(len(s) for s in ids)
    pad = int(tokenizer.pad_token_id or 0)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids, mask


# --- writing ------------------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder")


def _write_folder(out: Path, fill: Any) -> None:
    """Fill a temporary sibling of ``out`` with ``fill(folder)``, then rename it into place."""
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fill(work)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _manifest(
    source: ModuleSource, spec: LoraSpec, kind: str, hidden: int, pooling: str = "mean"
) -> dict[str, Any]:
    return {
        "fedpeft_export": EXPORT_VERSION,
        "format": kind,
        "origin": source.origin,
        "model": source.config.model,
        "base_model": hub_name(source.config.model),
        "peft": spec.to_dict(),
        "num_labels": source.config.num_labels,
        "hidden": hidden,
        "seq_len": source.config.seq_len,
        "train": source.config.to_dict(),
        "classifier": classifier_line(pooling),
    }


def _width(adapted: _Adapted) -> int:
    """The feature width the manifest records: CLIP's projection, else the model's hidden size."""
    config = adapted.classifier.encoder.config
    if adapted.task == ITM_TASK:
        return int(config.projection_dim)
    return int(config.hidden_size)


def _headless_manifest(adapted: _Adapted, seq_len: int) -> dict[str, Any]:
    """The manifest's lines for CLIP's matcher or a causal LM: what the model computes, the tokens a
    text gets (as the engine truncates), and for CLIP the image preprocessing and temperature."""
    from edge_runtime.engines.torch_engine import CLIP_MEAN, CLIP_STD, preprocessor_stats

    config = adapted.classifier.encoder.config
    if adapted.task == LM_TASK:
        return {"classifier": CAUSAL_LM, "seq_len": min(seq_len, int(config.max_position_embeddings))}
    vision, text = config.vision_config, config.text_config
    size, channels = int(vision.image_size), int(vision.num_channels)
    mean, std = preprocessor_stats(adapted.path, channels, CLIP_MEAN, CLIP_STD)
    return {
        "classifier": IMAGE_TEXT_MATCHER,
        "seq_len": min(seq_len, int(text.max_position_embeddings)),
        "preprocessing": _image_preprocessing(size, channels, mean, std),
        "logit_scale": float(adapted.classifier.scale()),
    }


def export_peft(source: ModuleSource, out: str | Path, *, threads: int | None = None) -> ExportResult:
    """Write the module as a peft LoRA adapter, the head and the tokenizer (see the module docstring)."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    _check_out(out)
    adapted = _adapted(source, threads)
    classifier, tokenizer, spec = adapted.classifier, adapted.tokenizer, adapted.spec
    headless = adapted.task in HEADLESS_TASKS
    hidden = _width(adapted) if headless else int(classifier.head.in_features)
    extra: dict[str, Any] = {"task": adapted.task}
    if headless:
        extra |= _headless_manifest(adapted, source.config.seq_len)
    else:
        extra["head"] = HEAD_NAME
    if adapted.task == "image-classification":
        from edge_runtime.engines.torch_engine import preprocessor_stats

        config = classifier.encoder.config
        size, channels = int(config.image_size), int(config.num_channels)
        mean, std = preprocessor_stats(adapted.path, channels)
        extra |= {
            "classifier": IMAGE_CLASSIFIER,
            "preprocessing": _image_preprocessing(size, channels, mean, std),
        }
    elif adapted.task == QA_TASK:
        segments, seq_len = _span_encoding(classifier.encoder, source.config.seq_len)
        extra |= {"classifier": SPAN_EXTRACTOR, "segments": segments, "seq_len": seq_len}

    def fill(folder: Path) -> None:
        # no embedding layers: LoRA never trains them, and checking would look the base up on the hub
        classifier.encoder.save_pretrained(str(folder), save_embedding_layers=False)
        if not headless:
            head = {
                "weight": classifier.head.weight.detach().clone(),
                "bias": classifier.head.bias.detach().clone(),
            }
            save_file(head, str(folder / HEAD_NAME))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        pooling = str(getattr(classifier, "pooling", "mean")) if adapted.task == "classification" else "mean"
        manifest = _manifest(source, spec, "peft", hidden, pooling) | extra
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    _write_folder(out, fill)
    return ExportResult(out=out, format="peft", origin=source.origin, tensors=adapted.tensors)


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{folder} is not a FedPEFT+ export (no {MANIFEST_NAME})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("fedpeft_export") != EXPORT_VERSION:
        raise ConfigError(f"{path} is not a version {EXPORT_VERSION} FedPEFT+ export manifest")
    return manifest


def load_exported(
    path: str | Path, *, base: str | Path | None = None, threads: int | None = None
) -> ExportedModel:
    """Rebuild the classifier of a ``--format peft`` export folder.

    The base encoder is the run's model (resolved as the engines do: the bundled MiniLM, a local
    folder or a hub id), or ``base`` if given; ``PeftModel.from_pretrained`` puts the adapter on
    it, and the head comes from ``head.safetensors``. The result's logits equal the torch engine's
    for the module that was exported.
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from edge_runtime.engines.torch_engine import (
        CausalLM,
        ImageClassifier,
        ImageTextMatcher,
        SpanExtractor,
        TextClassifier,
    )

    folder = Path(path).expanduser()
    manifest = _read_manifest(folder)
    task = str(manifest.get("task", "classification"))
    if manifest.get("format") != "peft":
        raise ConfigError(
            f"{folder} holds an {manifest.get('format')} export: open {ONNX_NAME} with "
            "onnxruntime.InferenceSession"
        )
    hf_logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    model_path = str(base) if base is not None else resolve_model(str(manifest["model"]))
    try:
        loader: Any = AutoModelForCausalLM if task == LM_TASK else AutoModel
        encoder = loader.from_pretrained(model_path, attn_implementation="eager")
        tokenizer = None if task == "image-classification" else AutoTokenizer.from_pretrained(str(folder))
    except OSError as exc:
        raise EngineError(f"cannot load the base model {model_path!r}: {exc}") from None
    adapted = PeftModel.from_pretrained(encoder, str(folder))
    if task in HEADLESS_TASKS:
        model = ImageTextMatcher(adapted) if task == ITM_TASK else CausalLM(adapted)
        model.eval()
        return ExportedModel(model=model, tokenizer=tokenizer, manifest=manifest)
    head = load_file(str(folder / HEAD_NAME))
    labels, hidden = (int(n) for n in head["weight"].shape)
    rows = 2 if task == QA_TASK else manifest.get("num_labels")  # QA: a start and an end logit
    if labels != rows or hidden != encoder.config.hidden_size:
        raise ShapeMismatch(
            f"{HEAD_NAME}: shape {tuple(head['weight'].shape)} does not fit the manifest's model"
        )
    classifier: TextClassifier | ImageClassifier | SpanExtractor
    if task == "image-classification":
        classifier = ImageClassifier(adapted, hidden, labels)
    elif task == QA_TASK:
        classifier = SpanExtractor(adapted, hidden)
    else:
        classifier = TextClassifier(adapted, hidden, labels, None, family_of(encoder.config).pooling)
    with torch.no_grad():
        classifier.head.weight.copy_(head["weight"])
        classifier.head.bias.copy_(head["bias"])
    classifier.eval()
    return ExportedModel(model=classifier, tokenizer=tokenizer, manifest=manifest)


def export_onnx(
    source: ModuleSource,
    out: str | Path,
    *,
    threads: int | None = None,
    texts: Sequence[str] = PROBE_TEXTS,
) -> ExportResult:
    """Write the merged classifier as ONNX and check it in onnxruntime (see the module docstring)."""
    import onnxruntime
    import torch
    from torch import nn

    from edge_runtime.engines.torch_engine import TextClassifier

    out = Path(out).expanduser()
    _check_out(out)
    adapted = _adapted(source, threads)
    if adapted.task == "image-classification":
        return _export_onnx_image(source, out, adapted, threads)
    if adapted.task == QA_TASK:
        return _export_onnx_spans(source, out, adapted, threads)
    if adapted.task == LM_TASK:
        return _export_onnx_causal_lm(source, out, adapted, threads, texts)
    if adapted.task == ITM_TASK:
        return _export_onnx_towers(source, out, adapted, threads, texts)
    classifier, tokenizer, spec = adapted.classifier, adapted.tokenizer, adapted.spec
    hidden, labels = int(classifier.head.in_features), int(classifier.head.out_features)
    input_ids, mask = _encode(tokenizer, texts, source.config.seq_len)
    with torch.no_grad():
        reference = classifier(input_ids, mask).numpy()
    try:  # in place: the unmerged classifier is gone after this
        merged_encoder = classifier.encoder.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge refuses weights that would turn NaN
        raise NonFinite(f"merging the LoRA module: {exc}") from None
    if classifier.pooling == "last_token":  # a decoder: trace its causal mask as plain tensor ops
        merged_encoder = _causal_mask_encoder(merged_encoder)
    merged = TextClassifier(merged_encoder, hidden, labels, None, classifier.pooling)
    merged.head.load_state_dict(classifier.head.state_dict())
    merged.eval()

    class WithFeatures(nn.Module):
        """The merged classifier with its unit-norm pooled features as a second output."""

        def __init__(self, inner: TextClassifier) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
            features = self.inner.features(input_ids, attention_mask)
            return self.inner.head(features), features

    measured: dict[str, float] = {}

    def fill(folder: Path) -> None:
        onnx_path = folder / ONNX_NAME
        example = _encode(tokenizer, _TRACE_TEXTS, source.config.seq_len)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                WithFeatures(merged),
                example,
                str(onnx_path),
                dynamo=False,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits", "features"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch"},
                    "features": {0: "batch"},
                },
                opset_version=ONNX_OPSET,
            )
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
        diff = float(np.abs(np.asarray(logits) - reference).max())
        if not diff <= ONNX_TOLERANCE:
            raise EngineError(
                f"the ONNX model's logits differ from torch's by {diff:.2e} (tolerance {ONNX_TOLERANCE:g})"
            )
        measured["max_abs_diff"] = diff
        tokenizer.save_pretrained(str(folder))
        manifest = _manifest(source, spec, "onnx", hidden, classifier.pooling) | {
            "onnx": _onnx_lines(
                ONNX_NAME,
                {"input_ids": "int64 batch x sequence", "attention_mask": "int64 batch x sequence"},
                {"logits": f"float32 batch x {labels}", "features": f"float32 batch x {hidden}"},
                {"checked_texts": len(texts)},
                diff,
            )
        }
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    _write_folder(out, fill)
    return ExportResult(
        out=out,
        format="onnx",
        origin=source.origin,
        tensors=adapted.tensors,
        max_abs_diff=measured["max_abs_diff"],
    )


def _merged_encoder(adapted: _Adapted) -> Any:
    """The base encoder with the LoRA update merged in (in place: the unmerged model is gone)."""
    try:
        return adapted.classifier.encoder.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge refuses weights that would turn NaN
        raise NonFinite(f"merging the LoRA module: {exc}") from None


def _export_graph(
    model: Any,
    example: tuple[Any, ...],
    path: Path,
    inputs: dict[str, dict[int, str]],
    outputs: dict[str, dict[int, str]],
) -> None:
    """``torch.onnx.export`` (TorchScript exporter) with named, partly dynamic inputs and outputs."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes={**inputs, **outputs},
            opset_version=ONNX_OPSET,
        )


def _check_in_onnxruntime(
    path: Path, feeds: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray], threads: int | None
) -> float:
    """Run the graph in an onnxruntime ``InferenceSession``; the largest absolute difference of its
    outputs from ``references``, which must be within :data:`ONNX_TOLERANCE`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(list(references), dict(feeds))
    diff = max(float(np.abs(np.asarray(g) - r).max()) for g, r in zip(got, references.values(), strict=True))
    if not diff <= ONNX_TOLERANCE:
        raise EngineError(
            f"the ONNX model's outputs differ from torch's by {diff:.2e} (tolerance {ONNX_TOLERANCE:g})"
        )
    return diff


def probe_images(size: int, count: int = PROBE_IMAGES, seed: int = 0) -> list[np.ndarray]:
    """``count`` seeded random uint8 RGB images, some at ``size`` and some at other sizes."""
    rng = np.random.default_rng(seed)
    shapes = [
        (size, size),
        (2 * size, size + 3),
        (max(1, size // 2), size),
        (size + 5, 2 * size),
        (size, size),
    ]
    return [rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(count)]


def _export_onnx_image(
    source: ModuleSource, out: Path, adapted: _Adapted, threads: int | None
) -> ExportResult:
    """The merged ViT classifier as ONNX: preprocessed pixels in, logits and features out."""
    import torch
    from torch import nn

    from edge_runtime.engines.torch_engine import ImageClassifier, pixel_values, preprocessor_stats

    classifier, spec = adapted.classifier, adapted.spec
    hidden, labels = int(classifier.head.in_features), int(classifier.head.out_features)
    config = classifier.encoder.config
    size, channels = int(config.image_size), int(config.num_channels)
    if channels not in (1, 3):
        raise ConfigError(f"model {source.config.model!r} takes {channels}-channel images; 1 or 3 are read")
    mean, std = preprocessor_stats(adapted.path, channels)
    pixels = pixel_values(probe_images(size), size, channels, mean, std)
    preprocessing = _image_preprocessing(size, channels, mean, std)
    with torch.no_grad():
        features = classifier.features(pixels)
        references = {"logits": classifier.head(features).numpy(), "features": features.numpy()}
    merged = ImageClassifier(_merged_encoder(adapted), hidden, labels)
    merged.head.load_state_dict(classifier.head.state_dict())
    merged.eval()

    class WithFeatures(nn.Module):
        """The merged classifier with its unit-norm class-token features as a second output."""

        def __init__(self, inner: ImageClassifier) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            features = self.inner.features(pixel_values)
            return self.inner.head(features), features

    measured: dict[str, float] = {}

    def fill(folder: Path) -> None:
        onnx_path = folder / ONNX_NAME
        batch = {0: "batch"}
        _export_graph(
            WithFeatures(merged),
            (pixels[:2],),
            onnx_path,
            {"pixel_values": batch},
            {"logits": batch, "features": batch},
        )
        diff = _check_in_onnxruntime(onnx_path, {"pixel_values": pixels.numpy()}, references, threads)
        measured["max_abs_diff"] = diff
        manifest = _manifest(source, spec, "onnx", hidden) | {
            "classifier": IMAGE_CLASSIFIER,
            "preprocessing": preprocessing,
            "onnx": _onnx_lines(
                ONNX_NAME,
                {"pixel_values": f"float32 batch x {channels} x {size} x {size}, preprocessed"},
                {"logits": f"float32 batch x {labels}", "features": f"float32 batch x {hidden}"},
                {"checked_images": len(pixels)},
                diff,
            ),
        }
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    _write_folder(out, fill)
    return ExportResult(
        out=out,
        format="onnx",
        origin=source.origin,
        tensors=adapted.tensors,
        max_abs_diff=measured["max_abs_diff"],
    )


def _image_preprocessing(size: int, channels: int, mean: Any, std: Any) -> dict[str, Any]:
    """How the engine turns an image into ``pixel_values``: the manifest's ``preprocessing``."""
    return {
        "image_size": size,
        "channels": channels,
        "resize": "bilinear, antialiased, to image_size x image_size",
        "scale": "pixel / 255; one channel: the mean of R, G and B",
        "image_mean": [float(v) for v in mean.reshape(-1).tolist()],
        "image_std": [float(v) for v in std.reshape(-1).tolist()],
    }


def _span_encoding(encoder: Any, seq_len: int) -> tuple[bool, int]:
    """Whether pairs carry segment ids, and the tokens a pair gets, as the torch engine decides:
    segment ids where the model has a table for two segments (BERT); at most ``seq_len`` tokens and
    no more than the position table holds past RoBERTa's padding offset."""
    config = encoder.config
    segments = int(getattr(config, "type_vocab_size", 0) or 0) >= 2
    padding_idx = getattr(getattr(encoder.get_base_model(), "embeddings", None), "padding_idx", None)
    room = int(config.max_position_embeddings) - (padding_idx + 1 if padding_idx is not None else 0)
    return segments, min(seq_len, room)


def encode_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], seq_len: int, segments: bool
) -> dict[str, torch.Tensor]:
    """Question-context pairs as the torch engine batches them: the context truncated so that the
    pair fits ``seq_len`` tokens, padded on the right; ``token_type_ids`` only with ``segments``."""
    if not pairs:
        raise ConfigError("no question-context pairs to encode")
    batch = tokenizer(
        [q for q, _ in pairs],
        [c for _, c in pairs],
        truncation="only_second",
        max_length=seq_len,
        padding=True,
        return_tensors="pt",
    )
    names = ("input_ids", "attention_mask", "token_type_ids") if segments else ("input_ids", "attention_mask")
    return {n: batch[n] for n in names}


def _export_onnx_spans(
    source: ModuleSource, out: Path, adapted: _Adapted, threads: int | None
) -> ExportResult:
    """The merged question answering model as ONNX: token ids in, start and end logits out."""
    import torch
    from torch import nn

    from edge_runtime.engines.torch_engine import SpanExtractor

    classifier, tokenizer, spec = adapted.classifier, adapted.tokenizer, adapted.spec
    hidden = int(classifier.head.in_features)
    segments, seq_len = _span_encoding(classifier.encoder, source.config.seq_len)
    feeds = encode_pairs(tokenizer, PROBE_QUESTIONS, seq_len, segments)
    with torch.no_grad():
        start, end = classifier(*feeds.values())
    references = {"start_logits": start.numpy(), "end_logits": end.numpy()}
    merged = SpanExtractor(_merged_encoder(adapted), hidden)
    merged.head.load_state_dict(classifier.head.state_dict())
    merged.eval()

    class Spans(nn.Module):
        """The merged model with its inputs as positional arguments, for the tracer."""

        def __init__(self, inner: SpanExtractor) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.inner(*inputs)

    measured: dict[str, float] = {}

    def fill(folder: Path) -> None:
        onnx_path = folder / ONNX_NAME
        tokens = {0: "batch", 1: "sequence"}
        example = encode_pairs(tokenizer, _TRACE_QUESTIONS, seq_len, segments)
        _export_graph(
            Spans(merged),
            tuple(example.values()),
            onnx_path,
            {n: tokens for n in example},
            {"start_logits": tokens, "end_logits": tokens},
        )
        diff = _check_in_onnxruntime(onnx_path, {n: t.numpy() for n, t in feeds.items()}, references, threads)
        measured["max_abs_diff"] = diff
        tokenizer.save_pretrained(str(folder))
        manifest = _manifest(source, spec, "onnx", hidden) | {
            "task": QA_TASK,
            "classifier": SPAN_EXTRACTOR,
            "seq_len": seq_len,
            "answer": "the best span of context tokens by start_logits[s] + end_logits[e], s <= e, "
            "at most 30 tokens (edge_runtime.qa_eval.best_span); padding is not masked in the graph",
            "onnx": _onnx_lines(
                ONNX_NAME,
                {n: "int64 batch x sequence" for n in feeds},
                {"start_logits": "float32 batch x sequence", "end_logits": "float32 batch x sequence"},
                {"checked_pairs": len(PROBE_QUESTIONS)},
                diff,
            ),
        }
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    _write_folder(out, fill)
    return ExportResult(
        out=out,
        format="onnx",
        origin=source.origin,
        tensors=adapted.tensors,
        max_abs_diff=measured["max_abs_diff"],
    )


def _export_onnx_causal_lm(
    source: ModuleSource, out: Path, adapted: _Adapted, threads: int | None, texts: Sequence[str]
) -> ExportResult:
    """The merged decoder with its LM head as ONNX: token ids in, next-token logits out."""
    import torch

    from edge_runtime.engines.torch_engine import CausalLM

    model, tokenizer, spec = adapted.classifier, adapted.tokenizer, adapted.spec
    extra = _headless_manifest(adapted, source.config.seq_len)
    input_ids, mask = _encode(tokenizer, texts, int(extra["seq_len"]))
    with torch.no_grad():
        reference = model(input_ids, mask).numpy()
    merged = CausalLM(_causal_mask_encoder(_merged_encoder(adapted)))
    merged.eval()
    vocab = int(reference.shape[-1])
    measured: dict[str, float] = {}

    def fill(folder: Path) -> None:
        onnx_path = folder / ONNX_NAME
        tokens = {0: "batch", 1: "sequence"}
        example = _encode(tokenizer, _TRACE_TEXTS, int(extra["seq_len"]))
        _export_graph(
            merged, example, onnx_path, {"input_ids": tokens, "attention_mask": tokens}, {"logits": tokens}
        )
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}
        diff = _check_in_onnxruntime(onnx_path, feeds, {"logits": reference}, threads)
        measured["max_abs_diff"] = diff
        tokenizer.save_pretrained(str(folder))
        manifest = _manifest(source, spec, "onnx", _width(adapted)) | {"task": LM_TASK} | extra
        manifest["onnx"] = _onnx_lines(
            ONNX_NAME,
            {"input_ids": "int64 batch x sequence", "attention_mask": "int64 batch x sequence"},
            {"logits": f"float32 batch x sequence x {vocab}"},
            {"checked_texts": len(texts)},
            diff,
        )
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    _write_folder(out, fill)
    return ExportResult(
        out=out,
        format="onnx",
        origin=source.origin,
        tensors=adapted.tensors,
        max_abs_diff=measured["max_abs_diff"],
    )


TEXT_TOWER_NAME = "text_model.onnx"
IMAGE_TOWER_NAME = "vision_model.onnx"


def _export_onnx_towers(
    source: ModuleSource, out: Path, adapted: _Adapted, threads: int | None, texts: Sequence[str]
) -> ExportResult:
    """CLIP with its merged LoRA update as two ONNX graphs, one a tower: captions in, unit-norm
    text embeddings out (``text_model.onnx``); preprocessed pixels in, unit-norm image embeddings
    out (``vision_model.onnx``). The logits are ``logit_scale * text @ image.T`` (the manifest)."""
    import torch
    from torch import nn

    from edge_runtime.engines.torch_engine import ImageTextMatcher, pixel_values

    matcher, tokenizer, spec = adapted.classifier, adapted.tokenizer, adapted.spec
    extra = _headless_manifest(adapted, source.config.seq_len)
    pre = extra["preprocessing"]
    size, channels = int(pre["image_size"]), int(pre["channels"])
    shape = (channels, 1, 1)
    mean = torch.tensor(pre["image_mean"], dtype=torch.float32).reshape(shape)
    std = torch.tensor(pre["image_std"], dtype=torch.float32).reshape(shape)
    pixels = pixel_values(probe_images(size), size, channels, mean, std)
    input_ids, mask = _encode(tokenizer, texts, int(extra["seq_len"]))
    with torch.no_grad():
        text_ref = matcher.text_embeddings(input_ids, mask).numpy()
        image_ref = matcher.image_embeddings(pixels).numpy()
    merged = ImageTextMatcher(_merged_encoder(adapted))
    merged.eval()

    class Texts(nn.Module):
        def __init__(self, inner: ImageTextMatcher) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner.text_embeddings(input_ids, attention_mask)

    class Images(nn.Module):
        def __init__(self, inner: ImageTextMatcher) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.inner.image_embeddings(pixel_values)

    width = _width(adapted)
    measured: dict[str, float] = {}

    def fill(folder: Path) -> None:
        tokens, batch = {0: "batch", 1: "sequence"}, {0: "batch"}
        example = _encode(tokenizer, _TRACE_TEXTS, int(extra["seq_len"]))
        text_path, image_path = folder / TEXT_TOWER_NAME, folder / IMAGE_TOWER_NAME
        _export_graph(
            Texts(merged),
            example,
            text_path,
            {"input_ids": tokens, "attention_mask": tokens},
            {"text_embeds": batch},
        )
        _export_graph(
            Images(merged), (pixels[:2],), image_path, {"pixel_values": batch}, {"image_embeds": batch}
        )
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}
        diff = max(
            _check_in_onnxruntime(text_path, feeds, {"text_embeds": text_ref}, threads),
            _check_in_onnxruntime(
                image_path, {"pixel_values": pixels.numpy()}, {"image_embeds": image_ref}, threads
            ),
        )
        measured["max_abs_diff"] = diff
        tokenizer.save_pretrained(str(folder))
        manifest = _manifest(source, spec, "onnx", width) | {"task": ITM_TASK} | extra
        manifest["onnx"] = _onnx_lines(
            f"{TEXT_TOWER_NAME} and {IMAGE_TOWER_NAME}",
            {
                "input_ids": f"int64 batch x sequence ({TEXT_TOWER_NAME})",
                "attention_mask": f"int64 batch x sequence ({TEXT_TOWER_NAME})",
                "pixel_values": (
                    f"float32 batch x {channels} x {size} x {size}, preprocessed ({IMAGE_TOWER_NAME})"
                ),
            },
            {
                "text_embeds": f"float32 batch x {width}, unit norm ({TEXT_TOWER_NAME})",
                "image_embeds": f"float32 batch x {width}, unit norm ({IMAGE_TOWER_NAME})",
            },
            {"checked_texts": len(texts), "checked_images": len(pixels)},
            diff,
        )
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    _write_folder(out, fill)
    return ExportResult(
        out=out,
        format="onnx",
        origin=source.origin,
        tensors=adapted.tensors,
        max_abs_diff=measured["max_abs_diff"],
    )


def _onnx_lines(
    files: str, inputs: dict[str, str], outputs: dict[str, str], checked: dict[str, int], diff: float
) -> dict[str, Any]:
    """The manifest's ``onnx`` block."""
    import torch

    return {
        "file": files,
        "opset": ONNX_OPSET,
        "exporter": f"torch.onnx.export (TorchScript), torch {torch.__version__}",
        "lora": "merged into the base weights",
        "inputs": inputs,
        "outputs": outputs,
        **checked,
        "max_abs_diff": diff,
        "tolerance": ONNX_TOLERANCE,
    }


def export_module(
    source: ModuleSource, out: str | Path, fmt: str, *, threads: int | None = None
) -> ExportResult:
    """Export ``source`` as ``fmt`` (``peft`` or ``onnx``) into the new folder ``out``."""
    if fmt == "peft":
        return export_peft(source, out, threads=threads)
    if fmt == "onnx":
        return export_onnx(source, out, threads=threads)
    raise ConfigError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
