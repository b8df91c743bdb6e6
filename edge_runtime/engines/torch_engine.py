"""The PyTorch training engine: a frozen Hugging Face model, a PEFT module and the task's head.

torch, transformers and peft are imported here and nowhere else in ``edge_runtime``, so a device
that runs the ONNX Runtime engine never loads them.

The model's family (:mod:`edge_runtime.families`, from its ``config.json``) says how features are
read: encoders (BERT, RoBERTa, DistilBERT) mean-pool the last hidden states over real tokens,
LLaMA-style decoders take the last real token's (the only one that has seen the whole text).
Either way the feature is L2-normalised (as sentence-transformers does for all-MiniLM-L6-v2);
the head is linear on that unit vector, so a head whose rows are scaled class means is a
nearest-normalised-class-mean classifier. ViT classifies images (an :class:`ImageDataset`) by
its class token's final hidden state, L2-normalised the same way; images are resized to the
model's ``image_size`` (bilinear, antialiased) and normalised with the ``image_mean`` and
``image_std`` of the folder's ``preprocessor_config.json`` (0.5 and 0.5, ViT's, without one).
Families the engine does not train yet (CLIP) are refused with the reason.

Extractive question answering (``TrainConfig.task == "question-answering"``, a
:class:`~edge_runtime.qa_data.QADataset`) trains BERT-family encoders with a
:class:`SpanExtractor`: a linear head gives every token a start and an end logit (the head's
two rows; no pooling, no normalisation). Question and context are tokenized as a pair, the
context truncated to ``seq_len`` tokens (one window: no document stride); a training answer that
falls outside the window points at the first token, as Hugging Face's ``run_qa`` does. The
predicted answer is the best-scoring span of at most
:data:`~edge_runtime.qa_eval.MAX_ANSWER_TOKENS` context tokens, read back from the context by the
tokenizer's character offsets (a fast tokenizer, ``tokenizer.json``, is needed), and scored with
SQuAD's exact match and F1 (:mod:`edge_runtime.qa_eval`). The class-mean statistics, class
probabilities and distillation are classification's and are refused for it.

Image-text matching (``TrainConfig.task == "image-text-matching"``, a
:class:`~edge_runtime.pair_data.PairDataset`) trains CLIP with an :class:`ImageTextMatcher`: both
towers and their projections, unit-norm embeddings, logits the cosine similarities times CLIP's
own temperature (``logit_scale``, frozen with the rest of the base), and the symmetric InfoNCE
loss over the batch (:func:`symmetric_info_nce`). There is no head; LoRA goes into both towers
(their projection names are the same). Captions are truncated to ``seq_len`` and the text
tower's positions; images are resized to the vision tower's ``image_size`` and normalised with
the ``preprocessor_config.json``'s mean and std (CLIP's without one). Evaluation embeds the whole
split and scores retrieval both ways (:mod:`edge_runtime.task_metrics`). Adapters and soft
prompts are refused for CLIP.

Causal-LM fine-tuning (``TrainConfig.task == "causal-lm"``, an
:class:`~edge_runtime.lm_data.LMDataset`) trains a LLaMA-style decoder with its own (frozen)
language-model head through a :class:`CausalLM`: the loss is the next-token cross-entropy over
every real token after the first; texts are truncated to ``seq_len`` tokens. A checkpoint
without an LM head (a bare decoder) is refused rather than given a random one.

PEFT kinds:

- ``lora``: the ``peft`` library's LoRA layers, injected into the target linear modules.
- ``adapter``: a :class:`BottleneckAdapter` after each chosen layer's attention and feed-forward
  output projections (the family's ``adapter_sites``; before dropout, residual and LayerNorm),
  attached by a forward hook and registered on the projection's parent module. For BERT the
  trainable names look like ``encoder.encoder.layer.3.attention.output.adapter.down.weight``.
- ``prompt``: a :class:`SoftPrompt` (``prompt.embeddings``, length x hidden) prepended to the word
  embeddings, with the attention mask extended by ones. Pooling skips the prompt positions. On
  ViT the prompt goes between the class token and the patches, after the position embeddings
  (shallow visual prompt tuning, Jia et al. 2022); it starts random (N(0, 0.02)), as there is no
  vocabulary to draw from.

:meth:`TorchEngine.class_feature_sums` reports the *frozen* model's features: every PEFT module is
bypassed (the soft prompt is left out). For LoRA and adapters at their initial state that is the
same as the current model; a soft prompt changes the features from the start, and the statistics
are meant to describe the base encoder that every device shares.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_runtime.config import TrainConfig
from edge_runtime.data import Dataset, ImageDataset
from edge_runtime.engines.base import (
    EVAL_BATCH,
    EvalResult,
    ProgressFn,
    TrainResult,
    macro_f1,
    micro_batches,
    row_shares,
)
from edge_runtime.errors import ConfigError, EngineError, ShapeMismatch
from edge_runtime.families import (
    CLASSLESS_TASKS,
    ITM_TASK,
    LM_TASK,
    QA_TASK,
    ModelFamily,
    check_data_task,
    engine_task,
    family_of,
    family_of_dir,
)
from edge_runtime.lm_data import LMDataset
from edge_runtime.models import resolve_model
from edge_runtime.pair_data import PairDataset
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, PromptSpec
from edge_runtime.qa_data import QADataset
from edge_runtime.qa_eval import answer_token_span, best_span, squad_scores
from edge_runtime.task_metrics import next_token_figures, retrieval_figures

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's image normalisation, for a CLIP folder without ``preprocessor_config.json``."""


class BottleneckAdapter(nn.Module):
    """h + f(h W_down) W_up, with W_up zero at the start so the adapter begins as the identity."""

    def __init__(self, hidden: int, bottleneck: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        self.act: nn.Module = nn.GELU() if activation == "gelu" else nn.ReLU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.active = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The adapted hidden states (unchanged while bypassed)."""
        if not self.active:
            return hidden
        return hidden + self.up(self.act(self.down(hidden)))

    def after(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook for the projection the adapter follows: replaces its output."""
        return self(output)


class SoftPrompt(nn.Module):
    """``length`` trainable embeddings placed before every sequence's own."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(init.detach().clone())
        self.active = True

    @property
    def length(self) -> int:
        """Number of prompt positions."""
        return int(self.embeddings.shape[0])


class TextClassifier(nn.Module):
    """Encoder (with an optional soft prompt), pooling, L2 normalisation, linear head.

    ``pooling`` is ``mean`` (masked mean over the text's tokens) or ``last_token`` (the hidden
    state of each row's last real token; rows are right-padded).
    """

    def __init__(
        self,
        encoder: nn.Module,
        hidden: int,
        num_labels: int,
        prompt: SoftPrompt | None = None,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "last_token"):
            raise ConfigError(f"text classification pools by 'mean' or 'last_token', not {pooling!r}")
        self.encoder: Any = encoder  # a transformers PreTrainedModel
        self.prompt = prompt
        self.pooling = pooling
        self.head = nn.Linear(hidden, num_labels)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm pooled sentence features over the text's tokens (never the prompt)."""
        if self.prompt is None or not self.prompt.active:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            words = self.encoder.get_input_embeddings()(input_ids)
            rows, length = input_ids.shape[0], self.prompt.length
            prompt = self.prompt.embeddings.unsqueeze(0).expand(rows, -1, -1)
            mask = torch.cat([attention_mask.new_ones((rows, length)), attention_mask], dim=1)
            out = self.encoder(inputs_embeds=torch.cat([prompt, words], dim=1), attention_mask=mask)
            hidden = out.last_hidden_state[:, length:]
        if self.pooling == "last_token":
            last = (attention_mask.sum(1) - 1).clamp_min(0)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            return nn.functional.normalize(pooled, dim=-1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.features(input_ids, attention_mask))


class ImageClassifier(nn.Module):
    """ViT encoder (with an optional soft prompt), its class token, L2 normalisation, linear head."""

    def __init__(
        self, encoder: nn.Module, hidden: int, num_labels: int, prompt: SoftPrompt | None = None
    ) -> None:
        super().__init__()
        self.encoder: Any = encoder  # a transformers ViTModel
        self.prompt = prompt
        self.pooling = "cls"
        self.head = nn.Linear(hidden, num_labels)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-norm class-token features of a batch of preprocessed images."""
        if self.prompt is None or not self.prompt.active:
            hidden = self.encoder(pixel_values=pixel_values).last_hidden_state
        else:
            embedded = self.encoder.embeddings(pixel_values)  # class token first, positions added
            prompt = self.prompt.embeddings.unsqueeze(0).expand(embedded.shape[0], -1, -1)
            tokens = torch.cat([embedded[:, :1], prompt, embedded[:, 1:]], dim=1)
            hidden = self.encoder.layernorm(self.encoder.encoder(tokens).last_hidden_state)
        return nn.functional.normalize(hidden[:, 0], dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.features(pixel_values))


class SpanExtractor(nn.Module):
    """Encoder (with an optional soft prompt) and a linear head: a start and an end logit per token."""

    def __init__(self, encoder: nn.Module, hidden: int, prompt: SoftPrompt | None = None) -> None:
        super().__init__()
        self.encoder: Any = encoder  # a transformers PreTrainedModel
        self.prompt = prompt
        self.head = nn.Linear(hidden, 2)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last hidden state of every text token (never the prompt's)."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if self.prompt is None or not self.prompt.active:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
            return out.last_hidden_state
        words = self.encoder.get_input_embeddings()(input_ids)
        rows, length = input_ids.shape[0], self.prompt.length
        prompt = self.prompt.embeddings.unsqueeze(0).expand(rows, -1, -1)
        mask = torch.cat([attention_mask.new_ones((rows, length)), attention_mask], dim=1)
        if token_type_ids is not None:
            extra = {
                "token_type_ids": torch.cat([token_type_ids.new_zeros((rows, length)), token_type_ids], 1)
            }
        out = self.encoder(inputs_embeds=torch.cat([prompt, words], dim=1), attention_mask=mask, **extra)
        return out.last_hidden_state[:, length:]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits, ``batch x tokens`` each."""
        logits = self.head(self.hidden_states(input_ids, attention_mask, token_type_ids))
        return logits[..., 0], logits[..., 1]


def symmetric_info_nce(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's loss on a texts x images logit matrix whose matches are the diagonal: the mean of
    the cross-entropies of picking each caption's image and each image's caption."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise EngineError(f"InfoNCE needs a square logit matrix, got {tuple(logits.shape)}")
    target = torch.arange(logits.shape[0], device=logits.device)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


class ImageTextMatcher(nn.Module):
    """CLIP's two towers and projections: unit-norm caption and image embeddings, scaled cosines."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.encoder: Any = clip  # a transformers CLIPModel
        self.pooling = "projection"

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm projected caption embeddings."""
        feats = self.encoder.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return nn.functional.normalize(feats, dim=-1)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-norm projected image embeddings."""
        return nn.functional.normalize(self.encoder.get_image_features(pixel_values=pixel_values), dim=-1)

    def scale(self) -> torch.Tensor:
        """CLIP's temperature, exp(logit_scale), capped at 100 as CLIP caps it."""
        return self.encoder.logit_scale.exp().clamp(max=100.0)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """Texts x images logits: the scaled cosine similarities."""
        texts = self.text_embeddings(input_ids, attention_mask)
        return self.scale() * texts @ self.image_embeddings(pixel_values).T


class CausalLM(nn.Module):
    """A decoder with its LM head (an optional soft prompt before the text): next-token logits."""

    def __init__(self, decoder: nn.Module, prompt: SoftPrompt | None = None) -> None:
        super().__init__()
        self.encoder: Any = decoder  # a transformers *ForCausalLM
        self.prompt = prompt
        self.pooling = "next_token"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary at every text position (``batch x tokens x vocab``)."""
        if self.prompt is None or not self.prompt.active:
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).logits
        words = self.encoder.get_input_embeddings()(input_ids)
        rows, length = input_ids.shape[0], self.prompt.length
        prompt = self.prompt.embeddings.unsqueeze(0).expand(rows, -1, -1)
        mask = torch.cat([attention_mask.new_ones((rows, length)), attention_mask], dim=1)
        out = self.encoder(inputs_embeds=torch.cat([prompt, words], dim=1), attention_mask=mask)
        return out.logits[:, length:]


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The target of position t is token t + 1 where that token is real; -100 (ignored) elsewhere
    and at the last position."""
    target = torch.full_like(input_ids, -100)
    target[:, :-1] = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return target


@dataclass(frozen=True)
class PairInputs:
    """Token ids of the captions and the preprocessed images of an image-text split."""

    input_ids: list[list[int]]
    pixels: torch.Tensor


@dataclass(frozen=True)
class LMInputs:
    """Token ids of the texts of a causal-LM split."""

    input_ids: list[list[int]]


@dataclass(frozen=True)
class SpanInputs:
    """Tokenized questions with their contexts, and where each training answer lies in tokens."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    offsets: list[list[tuple[int, int]]]
    in_context: list[list[bool]]
    starts: np.ndarray
    ends: np.ndarray


def preprocessor_stats(
    path: str, channels: int, default_mean: Any = 0.5, default_std: Any = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``image_mean`` and ``image_std`` from the model folder's ``preprocessor_config.json``
    (the defaults, ViT's 0.5 and 0.5, without one), shaped to broadcast over ``channels x H x W``."""
    import json

    mean: Any = default_mean
    std: Any = default_std
    config = Path(path) / "preprocessor_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except ValueError as exc:
            raise ConfigError(f"cannot read {config}: {exc}") from None
        mean, std = data.get("image_mean", mean), data.get("image_std", std)
    values = []
    for name, value in (("image_mean", mean), ("image_std", std)):
        t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.repeat(channels)
        if t.numel() != channels or (name == "image_std" and bool((t <= 0).any())):
            raise ConfigError(
                f"{config}: {name} must be one number or {channels} (positive for std), got {value!r}"
            )
        values.append(t.reshape(channels, 1, 1))
    return values[0], values[1]


def pixel_values(
    images: tuple[np.ndarray, ...] | list[np.ndarray],
    size: int,
    channels: int,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """uint8 ``H x W x 3`` images as a ViT reads them: ``N x channels x size x size``, resized
    (bilinear, antialiased), channels averaged for a one-channel model, normalised."""
    out = torch.empty((len(images), channels, size, size))
    for i, image in enumerate(images):
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        if tuple(x.shape[2:]) != (size, size):
            x = nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        if channels == 1:
            x = x.mean(dim=1, keepdim=True)
        out[i] = x[0]
    return (out - mean) / std


def _canonical(torch_name: str) -> str:
    # peft names adapters "default"; the wire format carries engine-neutral names.
    name = torch_name.replace(".default", "")
    return re.sub(r"\.(lora_[AB])\.weight$", r".\1", name)


class TorchEngine:
    """Trains a PEFT module with PyTorch; one instance serves many devices in turn."""

    name = "torch"

    def __init__(self, config: TrainConfig, *, seed: int = 0, threads: int | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if threads:
            torch.set_num_threads(threads)
        self.config = config
        path = resolve_model(config.model)
        if Path(path).is_dir():  # a family we do not know is refused before transformers reads it
            family_of_dir(path)
        try:
            model_config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load model {config.model!r}: {exc}") from None
        self.family: ModelFamily = family_of(model_config)
        self.task = engine_task(self.family, config.task, config.model)
        self.tokenizer: Any = None
        if self.task == ITM_TASK and not isinstance(config.peft, LoraSpec):
            raise ConfigError(
                f"image-text matching trains LoRA on CLIP's two towers; PEFT kind {config.peft.kind!r} "
                "is not supported for it (use --peft lora)"
            )
        try:
            if self.task != "image-classification":
                self.tokenizer = AutoTokenizer.from_pretrained(path)
            torch.manual_seed(seed)
            encoder = self._load_base(path, model_config)
        except OSError as exc:
            raise EngineError(f"cannot load model {config.model!r}: {exc}") from None
        # CLIP's configuration keeps the towers' sizes in text_config and vision_config; its
        # embeddings are projection_dim wide
        text_config = getattr(encoder.config, "text_config", encoder.config)
        hidden = int(getattr(encoder.config, "projection_dim", 0) or 0) if self.task == ITM_TASK else 0
        self.hidden = hidden or int(text_config.hidden_size)
        self.num_layers = int(text_config.num_hidden_layers)
        for p in encoder.parameters():
            p.requires_grad_(False)
        prompt = self._attach_peft(encoder)
        self.model: TextClassifier | ImageClassifier | SpanExtractor | ImageTextMatcher | CausalLM
        if self.task == ITM_TASK:
            vision = encoder.config.vision_config
            self.image_size, self.channels = int(vision.image_size), int(vision.num_channels)
            if self.channels not in (1, 3):
                raise ConfigError(
                    f"model {config.model!r} takes {self.channels}-channel images; 1 or 3 are read"
                )
            self._mean, self._std = preprocessor_stats(path, self.channels, CLIP_MEAN, CLIP_STD)
            self.max_tokens = min(config.seq_len, int(text_config.max_position_embeddings))
            self.model = ImageTextMatcher(encoder)
        elif self.task == LM_TASK:
            self.max_tokens = min(config.seq_len, int(encoder.config.max_position_embeddings))
            self.model = CausalLM(encoder, prompt)
        elif self.task == QA_TASK:
            padding_idx = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
            room = int(encoder.config.max_position_embeddings) - (
                padding_idx + 1 if padding_idx is not None else 0
            )
            self.max_tokens = min(config.seq_len, room)  # question, context and special tokens
            # segment ids where the model has a table for both segments (BERT); RoBERTa's single
            # row and DistilBERT's absent table take none, whatever the tokenizer returns
            self.segments = int(getattr(encoder.config, "type_vocab_size", 0) or 0) >= 2
            self.model = SpanExtractor(encoder, self.hidden, prompt)
        elif self.task == "image-classification":
            self.image_size = int(encoder.config.image_size)
            self.channels = int(encoder.config.num_channels)
            if self.channels not in (1, 3):
                raise ConfigError(
                    f"model {config.model!r} takes {self.channels}-channel images; 1 or 3 are read"
                )
            self._mean, self._std = preprocessor_stats(path, self.channels)
            self.model = ImageClassifier(encoder, self.hidden, config.num_labels, prompt)
        else:
            self.model = TextClassifier(encoder, self.hidden, config.num_labels, prompt, self.family.pooling)
        self.model.eval()  # no dropout in the frozen base; LoRA dropout is in its own module
        self._params: dict[str, nn.Parameter] = {
            _canonical(n): p for n, p in self.model.named_parameters() if p.requires_grad
        }
        self._token_cache: dict[int, tuple[Dataset, Any]] = {}

    def _load_base(self, path: str, model_config: Any) -> Any:
        """The frozen base: the bare encoder, or for causal LM the decoder with its LM head (a
        checkpoint without one is refused: a random head would be trained against nothing)."""
        from transformers import AutoModel, AutoModelForCausalLM

        if self.task != LM_TASK:
            return AutoModel.from_pretrained(path, config=model_config, attn_implementation="eager")
        try:
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                path, config=model_config, attn_implementation="eager", output_loading_info=True
            )
            decoder, info = loaded
        except ValueError as exc:
            raise EngineError(f"cannot load model {self.config.model!r} as a causal LM: {exc}") from None
        tied = bool(getattr(model_config, "tie_word_embeddings", False))
        if not tied and any(k.startswith("lm_head") for k in info.get("missing_keys", [])):
            raise ConfigError(
                f"model {self.config.model!r} has no language-model head (lm_head) in its weights: "
                "causal-LM fine-tuning needs a *ForCausalLM checkpoint"
            )
        return decoder

    def _attach_peft(self, encoder: nn.Module) -> SoftPrompt | None:
        """Add the spec's trainable module to the frozen encoder; a soft prompt is returned."""
        spec = self.config.peft
        if isinstance(spec, LoraSpec):
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(
                r=spec.rank,
                lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft takes floats; its hint says int
                target_modules=list(spec.target_modules),
                lora_dropout=spec.dropout,
                bias="none",
            )
            try:
                inject_adapter_in_model(lora, encoder)
            except ValueError as exc:
                raise ConfigError(
                    f"LoRA target modules not found in the {self.family.name} model (its attention "
                    f"projections: {', '.join(self.family.attention_modules)}): {exc}"
                ) from None
            return None
        if isinstance(spec, AdapterSpec):
            self._attach_adapters(encoder, spec)
            return None
        if isinstance(spec, PromptSpec):
            return self._make_prompt(encoder, spec)
        raise EngineError(f"the torch engine does not support PEFT kind {spec.kind!r}")

    def _attach_adapters(self, encoder: nn.Module, spec: AdapterSpec) -> None:
        wanted = set(range(self.num_layers) if spec.layers is None else spec.layers)
        beyond = sorted(i for i in wanted if i >= self.num_layers)
        if beyond:
            raise ConfigError(f"AdapterSpec.layers {beyond} are beyond the model's {self.num_layers} layers")
        modules = dict(encoder.named_modules())
        sites = []
        for name, module in modules.items():
            layer = self.family.adapter_site(name)
            if layer is not None and isinstance(module, nn.Linear) and layer in wanted:
                sites.append((modules[name.rpartition(".")[0]], module))
        if len(sites) != 2 * len(wanted):
            raise ConfigError(
                f"adapters follow the {self.family.name} family's output projections "
                f"({self.family.adapter_sites}); found {len(sites)} of {2 * len(wanted)} sites in "
                f"{type(encoder).__name__}"
            )
        for parent, projection in sites:
            adapter = BottleneckAdapter(projection.out_features, spec.bottleneck, spec.activation)
            parent.add_module("adapter", adapter)  # its parameters are named <parent>.adapter.*
            projection.register_forward_hook(adapter.after)

    def _make_prompt(self, encoder: Any, spec: PromptSpec) -> SoftPrompt:
        if self.task == "image-classification":  # no vocabulary and no position limit to meet
            return SoftPrompt(torch.randn(spec.length, int(encoder.config.hidden_size)) * 0.02)
        embeddings = encoder.get_input_embeddings()
        if not isinstance(embeddings, nn.Embedding):
            raise ConfigError(f"soft prompts need a word embedding table; {type(encoder).__name__} has none")
        # RoBERTa-style position ids start after the padding index, which costs positions.
        padding_idx = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
        reserved = padding_idx + 1 if padding_idx is not None else 0
        room = int(encoder.config.max_position_embeddings) - reserved
        if self.config.seq_len + spec.length > room:
            raise ConfigError(
                f"seq_len {self.config.seq_len} + prompt length {spec.length} exceeds the model's "
                f"{room} positions"
            )
        table = embeddings.weight.detach()
        if spec.init == "vocab":
            special = set(getattr(self.tokenizer, "all_special_ids", []))
            candidates = torch.tensor([i for i in range(table.shape[0]) if i not in special])
            picks = candidates[torch.randperm(len(candidates))[: spec.length]]
            if len(picks) < spec.length:  # a vocabulary smaller than the prompt: draw with repeats
                picks = candidates[torch.randint(len(candidates), (spec.length,))]
            init = table[picks]
        else:
            init = torch.randn(spec.length, table.shape[1]) * 0.02
        return SoftPrompt(init)

    @contextmanager
    def _frozen_base(self) -> Iterator[None]:
        """Bypass every PEFT module, whatever its state: the model is the frozen base inside."""
        toggled: list[Any] = []
        try:
            module: Any
            for module in self.model.modules():
                if isinstance(module, (BottleneckAdapter, SoftPrompt)) and module.active:
                    module.active = False
                    toggled.append(module)
                elif hasattr(module, "lora_A") and callable(getattr(module, "enable_adapters", None)):
                    if not getattr(module, "disable_adapters", False):
                        module.enable_adapters(False)
                        toggled.append(module)
            yield
        finally:
            for module in toggled:
                if isinstance(module, (BottleneckAdapter, SoftPrompt)):
                    module.active = True
                else:
                    module.enable_adapters(True)

    @property
    def total_params(self) -> int:
        """Parameters of the whole model, frozen ones included."""
        return sum(p.numel() for p in self.model.parameters())

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The trainable parameters by canonical name, as float32 arrays (copies)."""
        return {n: p.detach().cpu().numpy().astype(np.float32, copy=True) for n, p in self._params.items()}

    def load_trainable_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the trainable parameters; names and shapes must match exactly."""
        missing = set(self._params) - set(state)
        extra = set(state) - set(self._params)
        if missing or extra:
            raise ShapeMismatch(
                f"module names differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
        with torch.no_grad():
            for name, param in self._params.items():
                value = np.asarray(state[name], dtype=np.float32)
                if tuple(value.shape) != tuple(param.shape):
                    raise ShapeMismatch(f"{name}: shape {value.shape} != {tuple(param.shape)}")
                param.copy_(torch.from_numpy(value))

    def _inputs(self, data: Dataset) -> Any:
        """The model's inputs for ``data``, computed once per dataset object: token ids of texts,
        or a tensor of resized, normalised images."""
        cached = self._token_cache.get(id(data))
        if cached is not None and cached[0] is data:
            return cached[1]
        check_data_task(self.family, data.task, self.config.model)
        if data.task != self.task and (data.task in CLASSLESS_TASKS or self.task in CLASSLESS_TASKS):
            raise ConfigError(
                f"the data is for {data.task} but this engine trains {self.task} "
                "(TrainConfig.task): give the matching data folder or task"
            )
        inputs: Any
        if isinstance(data, ImageDataset):
            inputs = self._pixels(data)
        elif isinstance(data, QADataset):
            inputs = self._span_inputs(data)
        elif isinstance(data, PairDataset):
            ids = self.tokenizer(list(data.texts), truncation=True, max_length=self.max_tokens, padding=False)
            pixels = pixel_values(data.images, self.image_size, self.channels, self._mean, self._std)
            inputs = PairInputs(ids["input_ids"], pixels)
        elif isinstance(data, LMDataset):
            ids = self.tokenizer(list(data.texts), truncation=True, max_length=self.max_tokens, padding=False)
            short = [i for i, seq in enumerate(ids["input_ids"]) if len(seq) < 2]
            if short:
                raise ConfigError(
                    f"text {short[0]} ({data.texts[short[0]][:40]!r}) is a single token: causal-LM "
                    "fine-tuning needs at least two tokens a text (one to predict the next)"
                )
            inputs = LMInputs(ids["input_ids"])
        else:
            enc = self.tokenizer(
                list(data.texts), truncation=True, max_length=self.config.seq_len, padding=False
            )
            inputs = enc["input_ids"]
        if len(self._token_cache) > 64:
            self._token_cache.clear()
        self._token_cache[id(data)] = (data, inputs)
        return inputs

    def _span_inputs(self, data: QADataset) -> SpanInputs:
        """Question-context pairs as token ids, with character offsets and answer positions."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise EngineError(
                f"question answering needs a fast tokenizer (a tokenizer.json) for character "
                f"offsets; model {self.config.model!r} has none"
            )
        limit = self.max_tokens
        questions = self.tokenizer(list(data.questions), add_special_tokens=False)["input_ids"]
        special = int(self.tokenizer.num_special_tokens_to_add(pair=True))  # [CLS] q [SEP] c [SEP]: 3
        for qid, q in zip(data.ids, questions, strict=True):
            if len(q) + special + 1 > limit:  # at least one context token
                raise ConfigError(
                    f"question {qid!r} takes {len(q)} tokens, which leaves no room for its context "
                    f"in {limit} tokens (--seq-len, at most the model's positions)"
                )
        enc = self.tokenizer(
            list(data.questions),
            list(data.contexts),
            truncation="only_second",
            max_length=limit,
            padding=False,
            return_offsets_mapping=True,
        )
        offsets: list[list[tuple[int, int]]] = []
        in_context: list[list[bool]] = []
        starts = np.zeros(len(data), dtype=np.int64)
        ends = np.zeros(len(data), dtype=np.int64)
        for i, golds in enumerate(data.answers):
            inside = [sid == 1 for sid in enc.sequence_ids(i)]
            spans = [(int(a), int(b)) for a, b in enc["offset_mapping"][i]]
            span = answer_token_span(spans, inside, golds[0].start, golds[0].end)
            starts[i], ends[i] = span if span is not None else (0, 0)
            offsets.append(spans)
            in_context.append(inside)
        types = enc.get("token_type_ids") if self.segments else None
        return SpanInputs(enc["input_ids"], types, offsets, in_context, starts, ends)

    def _span_batch(
        self, inputs: SpanInputs, rows: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Padded ids, attention mask and (where the tokenizer gives them) token types of ``rows``."""
        ids, mask = self._batch(inputs.input_ids, rows)
        if inputs.token_type_ids is None:
            return ids, mask, None
        types = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            seq = inputs.token_type_ids[int(i)]
            types[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, mask, types

    def _span_logits(self, inputs: SpanInputs, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits of ``rows``, padding positions pushed to -1e4."""
        assert isinstance(self.model, SpanExtractor)
        ids, mask, types = self._span_batch(inputs, rows)
        start, end = self.model(ids, mask, types)
        pad = mask == 0
        return start.masked_fill(pad, -1e4), end.masked_fill(pad, -1e4)

    def _span_loss(self, inputs: SpanInputs, rows: np.ndarray) -> tuple[torch.Tensor, int]:
        """Mean of the start and end cross-entropies, and how many rows got both ends right."""
        start, end = self._span_logits(inputs, rows)
        s_target = torch.from_numpy(inputs.starts[rows])
        e_target = torch.from_numpy(inputs.ends[rows])
        loss = (nn.functional.cross_entropy(start, s_target) + nn.functional.cross_entropy(end, e_target)) / 2
        hits = int(((start.argmax(-1) == s_target) & (end.argmax(-1) == e_target)).sum())
        return loss, hits

    def _pair_logits(self, inputs: PairInputs, rows: np.ndarray) -> torch.Tensor:
        """Texts x images logits of the pairs ``rows``."""
        assert isinstance(self.model, ImageTextMatcher)
        ids, mask = self._batch(inputs.input_ids, rows)
        return self.model(ids, mask, inputs.pixels[torch.from_numpy(np.asarray(rows, dtype=np.int64))])

    def _lm_scores(
        self, inputs: LMInputs, rows: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy of ``rows``, and the predicted and target token of
        every scored position."""
        assert isinstance(self.model, CausalLM)
        ids, mask = self._batch(inputs.input_ids, rows)
        logits = self.model(ids, mask)
        target = next_token_targets(ids, mask)
        scored = target != -100
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        return loss, logits.argmax(-1)[scored], target[scored]

    def _batch_loss(self, inputs: Any, labels: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, float]:
        """The task's loss on ``rows`` and how many of them the model got right (for image-text
        pairs, captions whose own image scores highest; for causal LM, rows times the batch's
        next-token accuracy)."""
        if isinstance(inputs, SpanInputs):
            return self._span_loss(inputs, rows)
        if isinstance(inputs, PairInputs):
            logits = self._pair_logits(inputs, rows)
            hits = int((logits.argmax(-1) == torch.arange(len(rows))).sum())
            return symmetric_info_nce(logits), hits
        if isinstance(inputs, LMInputs):
            loss_sum, pred, target = self._lm_scores(inputs, rows)
            tokens = max(int(target.numel()), 1)
            return loss_sum / tokens, float((pred == target).sum()) / tokens * len(rows)
        target = labels[torch.from_numpy(rows)]
        logits = self._head()(self._rows_features(inputs, rows))
        return nn.functional.cross_entropy(logits, target), int((logits.argmax(-1) == target).sum())

    def _backward(self, inputs: Any, labels: torch.Tensor, rows: np.ndarray) -> tuple[float, float]:
        """Forward and backward of one batch; its mean loss and its hits.

        Where the task's loss is a mean over rows (classification, question answering), the batch
        runs in micro-batches of ``TrainConfig.micro_batch`` rows, sorted by length so that each
        pads only to its own longest text, and each micro-batch's loss is weighted by its share of
        the rows: the gradients summed over the micro-batches are the whole batch's (up to float
        rounding and dropout's random masks), in the memory of one micro-batch. Image-text pairs
        (a contrastive loss over the whole batch) and causal LM (a mean over tokens) run whole.
        """
        if isinstance(inputs, (PairInputs, LMInputs)):
            loss, hits = self._batch_loss(inputs, labels, rows)
            loss.backward()
            return float(loss.item()), hits
        seqs = inputs.input_ids if isinstance(inputs, SpanInputs) else inputs
        lengths = None if isinstance(seqs, torch.Tensor) else [len(seqs[int(i)]) for i in rows]
        chunks = micro_batches(rows, self.config.micro_rows(), lengths)
        total = 0.0
        hits_sum = 0.0
        for chunk, share in zip(chunks, row_shares(chunks), strict=True):
            loss, hits = self._batch_loss(inputs, labels, chunk)
            (loss * share).backward()
            total += float(loss.item()) * share
            hits_sum += hits
        return total, hits_sum

    def _head(self) -> nn.Linear:
        """The classifier's linear head (classification only)."""
        if isinstance(self.model, (TextClassifier, ImageClassifier)):
            return self.model.head
        raise EngineError(f"this engine trains {self.task}, which has no class head")

    def _classifier_only(self, what: str) -> None:
        if self.task in CLASSLESS_TASKS:
            raise EngineError(f"{what} is for classification; this engine trains {self.task} (no classes)")

    def _tokens(self, data: Dataset) -> list[list[int]]:
        """Token ids of every text of ``data`` (cached; a text model's :meth:`_inputs`)."""
        ids: list[list[int]] = self._inputs(data)
        return ids

    def _pixels(self, data: ImageDataset) -> torch.Tensor:
        """Images as the model reads them: ``N x channels x size x size``, resized and normalised."""
        return pixel_values(data.images, self.image_size, self.channels, self._mean, self._std)

    def _rows_features(self, inputs: Any, rows: np.ndarray) -> torch.Tensor:
        """Features of the rows ``rows`` of prepared ``inputs`` (see :meth:`_inputs`)."""
        if isinstance(self.model, (SpanExtractor, ImageTextMatcher, CausalLM)):
            raise EngineError(f"pooled features are for classification; this engine trains {self.task}")
        if isinstance(self.model, ImageClassifier):
            return self.model.features(inputs[torch.from_numpy(np.asarray(rows, dtype=np.int64))])
        input_ids, mask = self._batch(inputs, rows)
        return self.model.features(input_ids, mask)

    def _batch(self, ids: list[list[int]], rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [ids[int(i)] for i in rows]
        width = max(len(s) for s in seqs)
        pad = int(self.tokenizer.pad_token_id or 0)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        return input_ids, mask

    def train(
        self, data: Dataset, *, epochs: int, seed: int, progress: ProgressFn | None = None
    ) -> TrainResult:
        """Train the module in place; loss = CE + prox_mu * ||theta - theta0||^2."""
        cfg = self.config
        if len(data) == 0:
            raise EngineError("cannot train on an empty dataset")
        inputs = self._inputs(data)
        labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
        # FFA-LoRA: the A factors stay at their shared initial values, out of the optimizer and
        # of autograd, so neither gradients nor weight decay can move them
        freeze_a = isinstance(cfg.peft, LoraSpec) and not cfg.peft.train_a
        frozen = [p for n, p in self._params.items() if freeze_a and n.endswith(".lora_A")]
        head = [p for n, p in self._params.items() if n.startswith("head.")]
        body = [
            p
            for n, p in self._params.items()
            if not n.startswith("head.") and not (freeze_a and n.endswith(".lora_A"))
        ]
        for p in frozen:
            p.requires_grad_(False)
        groups: list[dict[str, Any]] = [{"params": body, "lr": cfg.lr}]
        if cfg.head_lr > 0:
            groups.append({"params": head, "lr": cfg.head_lr})
        else:
            for p in head:
                p.requires_grad_(False)
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        anchor = [p.detach().clone() for p in body + head] if cfg.prox_mu > 0 else []
        rng = np.random.default_rng(seed)
        steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
        total = steps_per_epoch * epochs
        step = 0
        loss_sum = 0.0
        correct = 0.0
        seen = 0
        start = time.perf_counter()
        self.model.train()
        try:
            for _ in range(epochs):
                order = rng.permutation(len(data))
                for b in range(steps_per_epoch):
                    rows = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    loss_value, hits = self._backward(inputs, labels, rows)
                    if anchor:
                        prox_loss = (
                            cfg.prox_mu
                            * torch.stack(
                                [((p - a) ** 2).sum() for p, a in zip(body + head, anchor, strict=True)]
                            ).sum()
                        )
                        prox_loss.backward()
                        loss_value += float(prox_loss.item())
                    if not math.isfinite(loss_value):
                        raise EngineError(f"training diverged (loss {loss_value}) at step {step}")
                    torch.nn.utils.clip_grad_norm_(body + head, 1.0)
                    optimizer.step()
                    step += 1
                    loss_sum += loss_value * len(rows)
                    correct += hits
                    seen += len(rows)
                    if progress is not None:
                        progress(step, total)
        finally:
            self.model.eval()
            for p in head + frozen:
                p.requires_grad_(True)
        return TrainResult(
            steps=step,
            samples=seen,
            loss=loss_sum / max(seen, 1),
            accuracy=correct / max(seen, 1),
            seconds=time.perf_counter() - start,
        )

    def distill(
        self,
        texts: Dataset,
        teacher_probs: np.ndarray,
        *,
        alpha: float,
        epochs: int,
        seed: int,
        train_head: bool = False,
    ) -> TrainResult:
        """Train the module toward a teacher's class probabilities on unlabeled ``texts``.

        loss = alpha * CE(student, argmax teacher) + (1 - alpha) * KL(student || teacher), the
        labels of ``texts`` are never read. The head stays frozen unless ``train_head`` (it is
        shared by kinds whose bodies are distilled one after another).
        """
        cfg = self.config
        self._classifier_only("distillation toward class probabilities")
        if len(texts) == 0:
            raise EngineError("cannot distill on an empty dataset")
        probs = torch.from_numpy(np.asarray(teacher_probs, dtype=np.float32))
        if probs.shape != (len(texts), cfg.num_labels):
            raise EngineError(f"teacher probabilities of shape {tuple(probs.shape)} for {len(texts)} texts")
        log_teacher = torch.log(probs.clamp_min(1e-8))
        pseudo = probs.argmax(-1)
        inputs = self._inputs(texts)
        names = [n for n in self._params if train_head or not n.startswith("head.")]
        if isinstance(cfg.peft, LoraSpec) and not cfg.peft.train_a:
            names = [n for n in names if not n.endswith(".lora_A")]
        params = [self._params[n] for n in names]
        frozen = [p for n, p in self._params.items() if n not in names]
        for p in frozen:
            p.requires_grad_(False)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng = np.random.default_rng(seed)
        steps_per_epoch = math.ceil(len(texts) / cfg.batch_size)
        step, loss_sum, agree, seen = 0, 0.0, 0, 0
        start = time.perf_counter()
        self.model.train()
        # dropout draws from torch's generator: seed it here, so the result depends on ``seed``
        # alone, not on what this engine did before (the service distills kinds in any order)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            try:
                for _ in range(epochs):
                    order = rng.permutation(len(texts))
                    for b in range(steps_per_epoch):
                        rows = torch.from_numpy(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
                        logits = self._head()(self._rows_features(inputs, rows.numpy()))
                        log_student = nn.functional.log_softmax(logits, dim=-1)
                        kl = (log_student.exp() * (log_student - log_teacher[rows])).sum(-1).mean()
                        loss = alpha * nn.functional.cross_entropy(logits, pseudo[rows]) + (1 - alpha) * kl
                        if not torch.isfinite(loss):
                            raise EngineError(f"distillation diverged (loss {loss.item()}) at step {step}")
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, 1.0)
                        optimizer.step()
                        step += 1
                        loss_sum += float(loss.item()) * len(rows)
                        agree += int((logits.argmax(-1) == pseudo[rows]).sum())
                        seen += len(rows)
            finally:
                self.model.eval()
                for p in frozen:
                    p.requires_grad_(True)
        return TrainResult(
            steps=step,
            samples=seen,
            loss=loss_sum / max(seen, 1),
            accuracy=agree / max(seen, 1),  # agreement with the teacher
            seconds=time.perf_counter() - start,
        )

    @torch.no_grad()
    def predict_proba(self, data: Dataset, *, batch_size: int = EVAL_BATCH) -> np.ndarray:
        """Class probabilities of the current module for every sample of ``data``."""
        self._classifier_only("class probabilities")
        logits = self._head()(self._pooled(data, batch_size))
        return np.asarray(torch.softmax(logits, dim=-1).numpy(), dtype=np.float64)

    @torch.no_grad()
    def _pooled(self, data: Dataset, batch_size: int) -> torch.Tensor:
        """Pooled features of ``data`` with the model as it is (callers may bypass the module)."""
        inputs = self._inputs(data)
        if isinstance(inputs, torch.Tensor):
            order = np.arange(len(data))
        else:  # similar lengths pad less
            order = np.argsort([len(s) for s in inputs], kind="stable")
        out = torch.empty((len(data), self.hidden))
        for start in range(0, len(data), batch_size):
            rows = order[start : start + batch_size]
            out[torch.from_numpy(rows)] = self._rows_features(inputs, rows)
        return out

    @torch.no_grad()
    def evaluate(self, data: Dataset, *, batch_size: int = EVAL_BATCH) -> EvalResult:
        """Accuracy, macro F1 and mean cross-entropy of the current module on ``data``."""
        if len(data) == 0:
            raise EngineError("cannot evaluate on an empty dataset")
        if isinstance(data, QADataset):
            return self._evaluate_spans(data, batch_size)
        if isinstance(data, PairDataset):
            return self._evaluate_pairs(data, batch_size)
        if isinstance(data, LMDataset):
            return self._evaluate_lm(data, batch_size)
        if isinstance(self.model, (ImageTextMatcher, CausalLM)):
            check_data_task(self.family, data.task, self.config.model)  # the reason, where it has one
            raise ConfigError(f"this engine trains {self.task}; it cannot evaluate {data.task} data")
        logits = self._head()(self._pooled(data, batch_size))
        labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
        loss = float(nn.functional.cross_entropy(logits, labels).item())
        pred = logits.argmax(-1).numpy()
        y = labels.numpy()
        return EvalResult(
            accuracy=float((pred == y).mean()),
            macro_f1=macro_f1(y, pred, self.config.num_labels),
            loss=loss,
            predictions=pred,
        )

    @torch.no_grad()
    def _evaluate_pairs(self, data: PairDataset, batch_size: int) -> EvalResult:
        """Retrieval both ways over the whole split: mean recall@1 (as ``accuracy``), mean
        recall@5 (as ``macro_f1``), the symmetric InfoNCE of the split as one batch (as ``loss``)."""
        inputs = self._inputs(data)
        if not isinstance(inputs, PairInputs) or not isinstance(self.model, ImageTextMatcher):
            raise EngineError(f"image-text data gave {type(inputs).__name__} inputs")
        texts = torch.empty((len(data), self.hidden))
        images = torch.empty((len(data), self.hidden))
        for first in range(0, len(data), batch_size):
            rows = np.arange(first, min(first + batch_size, len(data)))
            ids, mask = self._batch(inputs.input_ids, rows)
            texts[first : first + len(rows)] = self.model.text_embeddings(ids, mask)
            images[first : first + len(rows)] = self.model.image_embeddings(
                inputs.pixels[first : first + len(rows)]
            )
        similarity = texts @ images.T
        loss = float(symmetric_info_nce(self.model.scale() * similarity).item())
        figures = retrieval_figures(similarity.numpy())
        return EvalResult(
            accuracy=figures["mean_recall@1"],
            macro_f1=figures["mean_recall@5"],
            loss=loss,
            predictions=similarity.argmax(-1).numpy(),  # each caption's best image
            task=ITM_TASK,
            extra=figures,
        )

    @torch.no_grad()
    def _evaluate_lm(self, data: LMDataset, batch_size: int) -> EvalResult:
        """Next-token accuracy (as ``accuracy``), macro F1 over token ids (as ``macro_f1``), mean
        next-token cross-entropy (``loss``) and perplexity (in ``extra``) over every scored token."""
        inputs = self._inputs(data)
        if not isinstance(inputs, LMInputs):
            raise EngineError(f"causal-LM data gave {type(inputs).__name__} inputs")
        assert isinstance(self.model, CausalLM)
        order = np.argsort([len(s) for s in inputs.input_ids], kind="stable")  # similar lengths pad less
        preds: list[np.ndarray] = []
        golds: list[np.ndarray] = []
        per_text = np.zeros(len(data))
        loss_sum = 0.0
        for first in range(0, len(data), batch_size):
            rows = order[first : first + batch_size]
            ids, mask = self._batch(inputs.input_ids, rows)
            logits = self.model(ids, mask)
            target = next_token_targets(ids, mask)
            scored = target != -100
            loss_sum += float(
                nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    target.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                ).item()
            )
            pred = logits.argmax(-1)
            preds.append(pred[scored].numpy())
            golds.append(target[scored].numpy())
            right = ((pred == target) & scored).sum(1).float() / scored.sum(1).clamp_min(1).float()
            per_text[rows] = right.numpy()
        figures = next_token_figures(np.concatenate(preds), np.concatenate(golds), loss_sum)
        return EvalResult(
            accuracy=figures["next_token_accuracy"],
            macro_f1=figures["macro_f1"],
            loss=figures["loss"],
            predictions=per_text,  # each text's next-token accuracy
            task=LM_TASK,
            extra={k: figures[k] for k in ("next_token_accuracy", "perplexity", "tokens")},
        )

    @torch.no_grad()
    def _evaluate_spans(self, data: QADataset, batch_size: int) -> EvalResult:
        """SQuAD exact match (as ``accuracy``) and F1 (as ``macro_f1``) of the predicted spans."""
        inputs = self._inputs(data)
        if not isinstance(inputs, SpanInputs):
            raise EngineError(f"question answering data gave {type(inputs).__name__} inputs")
        order = np.argsort([len(s) for s in inputs.input_ids], kind="stable")  # similar lengths pad less
        predictions = [""] * len(data)
        loss_sum = 0.0
        for first in range(0, len(data), batch_size):
            rows = order[first : first + batch_size]
            start, end = self._span_logits(inputs, rows)
            s_target = torch.from_numpy(inputs.starts[rows])
            e_target = torch.from_numpy(inputs.ends[rows])
            loss = nn.functional.cross_entropy(start, s_target, reduction="sum")
            loss = loss + nn.functional.cross_entropy(end, e_target, reduction="sum")
            loss_sum += float(loss.item()) / 2
            for r, i in enumerate(int(x) for x in rows):
                width = len(inputs.input_ids[i])
                s, e = best_span(
                    start[r, :width].numpy(), end[r, :width].numpy(), np.asarray(inputs.in_context[i])
                )
                predictions[i] = data.contexts[i][inputs.offsets[i][s][0] : inputs.offsets[i][e][1]]
        em, f1 = squad_scores(predictions, [[a.text for a in golds] for golds in data.answers])
        return EvalResult(
            accuracy=em,
            macro_f1=f1,
            loss=loss_sum / len(data),
            predictions=np.asarray(predictions, dtype=object),
            task=QA_TASK,
        )

    @torch.no_grad()
    def class_feature_sums(self, data: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """Per-class sums of the frozen model's pooled features (module bypassed) and per-class counts."""
        self._classifier_only("the class-mean head (class feature statistics)")
        with self._frozen_base():
            feats = self._pooled(data, EVAL_BATCH).numpy().astype(np.float64)
        c = self.config.num_labels
        labels = np.asarray(data.labels, dtype=np.int64)
        sums = np.zeros((c, self.hidden), dtype=np.float64)
        np.add.at(sums, labels, feats)
        counts = np.bincount(labels, minlength=c).astype(np.float64)
        return sums.astype(np.float32), counts.astype(np.float32)
