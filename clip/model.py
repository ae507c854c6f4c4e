"""The CLIP model: an image encoder and a text encoder projected into one embedding space, compared by
cosine similarity scaled by a learned temperature."""

from __future__ import annotations

import dataclasses
import difflib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import ModelConfig, constructor_arguments, get_architecture, openai_model_config
from .batch_norm_relu import is_torch_func_wrapped
# The building blocks under openai/CLIP's names in its `clip.model`, for code that imports them from there
from .modified_resnet import AttentionPool2d, Bottleneck, ModifiedResNet  # noqa: F401
from .transformer import (  # noqa: F401
    LayerNorm,
    MultiheadSelfAttention,
    QuickGELU,
    ResidualAttentionBlock,
    Transformer,
    causal_mask,
    refuse_scripting,
    runs_as_openai,
)
from .vision_transformer import VisionTransformer

# The CLIP paper initialises the temperature to 0.07, i.e. logit_scale = log(1 / 0.07).
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
TEXT_LENGTH_MULTIPLE = 8


def build_vision_tower(config: ModelConfig) -> nn.Module:
    """The image encoder, its embeddings and attention left for `CLIP.init_parameters` (so that a seeded
    model's weights come from the same random draws as they always have)."""
    vision = config.vision
    if vision.kind == "resnet":
        return ModifiedResNet(vision, config.embed_dim, initialise=False)
    return VisionTransformer(vision, config.embed_dim, config.activation, initialise=False)


class CLIP(nn.Module):
    """`CLIP(config)`, or `CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
    context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)` as openai/CLIP's
    constructor is called (see `clip.architectures.openai_model_config`)."""

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, config: ModelConfig | int | None = None, *openai_arguments, **openai_keyword_arguments) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):  # openai/CLIP's arguments, the first (embed_dim) maybe by name
            leading = () if config is None else (config,)
            config = constructor_arguments("CLIP", openai_model_config, *leading, *openai_arguments,
                                           **openai_keyword_arguments)
        elif openai_arguments or openai_keyword_arguments:
            raise TypeError("CLIP takes a ModelConfig alone, or openai/CLIP's ten architecture arguments")
        self.config = config
        text = config.text
        self.context_length = text.context_length
        self.vocab_size = text.vocab_size

        self.visual = build_vision_tower(config)

        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.transformer = Transformer(
            text.width, text.layers, text.heads, self.build_attention_mask(),
            mlp_ratio=text.mlp_ratio, activation=config.activation, causal=True, initialise=False,
        )
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))
        # A SigLIP-trained model's learned bias (its loss's parameter, not a weight of the towers): set by
        # clip.load from such a run's checkpoint, then added to the logits `forward` returns, so that their
        # sigmoid is the model's match probability. None for a model trained with the CLIP loss. Moves with
        # the model; not part of the state dict, which keeps OpenAI's keys.
        self.register_buffer("logit_bias", None, persistent=False)

        self.init_parameters()

    def init_parameters(self) -> None:
        """openai/CLIP's initialisation (from its code: the paper gives none), written out in one place: the
        text transformer's depth-scaled normal init, the embeddings, projections, attention pool and zeroed
        last BatchNorm gains as there. Two differences: the ViT's blocks get the same depth-scaled init as
        the text transformer (openai's code, like open_clip, leaves them at PyTorch's defaults; the scaling
        keeps a deep residual stream's variance bounded), and linear biases start at zero."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_parameters()
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)
        self.visual.init_parameters()
        with torch.no_grad():
            self.logit_scale.fill_(INITIAL_LOGIT_SCALE)

    initialize_parameters = init_parameters  # openai/CLIP's name

    def build_attention_mask(self) -> torch.Tensor:
        """openai/CLIP's: the text encoder's causal mask over the context, -inf above the diagonal."""
        return causal_mask(self.context_length)

    def text_tower(self) -> list[nn.Module]:
        """The modules of the text encoder (the image encoder is `visual`); logit_scale belongs to neither."""
        return [self.token_embedding, self.transformer, self.ln_final]

    def text_tower_parameters(self) -> list[nn.Parameter]:
        modules = (p for m in self.text_tower() for p in m.parameters())
        return [*modules, self.positional_embedding, self.text_projection]

    def lock(
        self, image: bool = False, text: bool = False, image_unlocked_layers: int = 0, text_unlocked_layers: int = 0,
    ) -> None:
        """Freezes (True) or unfreezes (False) each tower's parameters (LiT, "locked-image tuning": a locked
        tower gets no gradients, no optimizer state and keeps no activations for a backward pass). The
        trainer also keeps a locked tower in eval mode, so a ResNet's BatchNorm statistics stay as loaded.
        *_unlocked_layers: a locked tower's top (`tower_top`) that still trains (0: none)."""
        for parameter in self.visual.parameters():
            parameter.requires_grad_(not image)
        for parameter in self.text_tower_parameters():
            parameter.requires_grad_(not text)
        for locked, tower, layers in ((image, "image", image_unlocked_layers), (text, "text", text_unlocked_layers)):
            if layers and not locked:
                raise ValueError(f"{tower}_unlocked_layers={layers} applies to a locked tower ({tower}=True) only")
            modules, parameters = self.tower_top(tower, layers)
            for parameter in [*(p for m in modules for p in m.parameters()), *parameters]:
                parameter.requires_grad_(True)

    def tower_top(self, tower: str, layers: int) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """A tower's last `layers` layers and what follows them -- (modules, parameters outside them): for a
        transformer its last blocks, final LayerNorm and projection; for the ResNet its last stages (layer4
        first) and attention pool. What a partly locked tower trains (open_clip's unlocked groups count the
        projection as one of its own: its N + 1); the stem, embeddings and lower layers stay locked. 0 layers:
        nothing. A projection set to None (for unprojected features) is left out."""
        visual = self.visual
        if tower == "image" and self.config.vision.kind == "resnet":
            stages = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
            stack, after, parameters = stages, [visual.attnpool], []
        elif tower == "image":
            stack, after, parameters = list(visual.transformer.resblocks), [visual.ln_post], [visual.proj]
        elif tower == "text":
            stack, after, parameters = list(self.transformer.resblocks), [self.ln_final], [self.text_projection]
        else:
            raise ValueError(f'tower must be "image" or "text", got {tower!r}')
        if not 0 <= layers <= len(stack):
            raise ValueError(f"the {tower} tower has {len(stack)} layers; {layers} cannot be unlocked")
        parameters = [parameter for parameter in parameters if parameter is not None]
        return ([*stack[-layers:], *after], parameters) if layers else ([], [])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the image encoder's weights (float16 for OpenAI's checkpoints on a GPU, float32
        otherwise); images are cast to it, as openai/CLIP does."""
        return self.visual.conv1.weight.dtype

    def set_patch_dropout(self, fraction: float) -> None:
        """Patch dropout (FLIP) for a ViT image tower: in training mode, this fraction of each image's patch
        tokens is left out (a new random subset each time); 0 turns it off."""
        if self.config.vision.kind != "vit":
            raise ValueError("patch dropout applies to ViT image towers only")
        if not 0 <= fraction < 1:
            raise ValueError(f"patch dropout must be in [0, 1), got {fraction}")
        self.visual.patch_dropout = fraction

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.transformer.grad_checkpointing = enabled
        if self.config.vision.kind == "vit":
            self.visual.transformer.grad_checkpointing = enabled

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(self._float_images(image))  # N3HW -> N,embed_dim
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image_unprojected(self, image: torch.Tensor) -> torch.Tensor:
        """The image features the CLIP paper's linear probes use: for a ViT the class token before the linear
        projection to the embedding space (I_f in the paper's Figure 3, `visual.width` wide); for a ResNet,
        whose attention pool is its last layer, the embedding itself."""
        if self.config.vision.kind == "vit":  # (forward hooks on `visual` do not run on this path)
            return self.visual.forward_unprojected(self._float_images(image))
        return self.visual(self._float_images(image))

    def _float_images(self, image: torch.Tensor) -> torch.Tensor:
        """`image` in the weights' dtype. Integer pixels (torchvision.io.read_image's uint8) are refused: cast,
        they ran as values up to 255, neither scaled nor normalised, and gave features without an error."""
        if not isinstance(image, torch.Tensor):  # a PIL image or an array: "has no attribute 'is_floating_point'"
            raise TypeError(
                f"images of type {type(image).__name__}; this model takes a float tensor [N, 3, H, W]: "
                f"preprocess(image).unsqueeze(0) for one PIL image (the preprocess clip.load returns), "
                f"torch.stack([preprocess(image) for image in images]) for several"
            )
        if not image.is_floating_point():
            raise TypeError(
                f"images of dtype {image.dtype}; this model takes float images, scaled and normalised as the "
                f"preprocess clip.load returns makes them (clip.image_transform(model.visual.input_resolution))"
            )
        return image.to(self.dtype)

    def encode_text(self, text: torch.Tensor, normalize: bool = False, trim: bool = True) -> torch.Tensor:
        """Features of token ids [N, L] (L <= context_length, or longer with padding only past the context, as
        clip.tokenize's default 77 gives a model of a shorter one). `trim=False` runs all L positions as given: for
        callers that cut the batch already (`trim_text_batch` on the host), so that no device-to-host sync
        (reading the longest caption's length off the GPU) interrupts the forward pass. A text tower that
        outside code watches or changes (`clip.transformer.runs_as_openai`: hooks, replaced attention
        methods) keeps every position of the context, as openai/CLIP's, and so does a traced model
        (torch.jit.trace, ONNX export): a length read from one example would be fixed in the trace."""
        context = self.context_length
        if not isinstance(text, torch.Tensor):  # a str or a list of them: "has no attribute 'dim'"
            raise TypeError(
                f"text of type {type(text).__name__}; this model takes token ids [N, L]: "
                f"model.encode_text(clip.tokenize(texts))"
            )
        if text.is_floating_point() or text.is_complex() or text.dtype == torch.bool:
            raise TypeError(f"text of dtype {text.dtype}; this model takes integer token ids, as clip.tokenize "
                            f"returns them")
        if text.dim() != 2:  # a row of clip.tokenize's output (tokens[i]) failed with "too many indices"
            raise ValueError(
                f"text of shape {tuple(text.shape)}; this model takes token ids [N, L], as clip.tokenize returns "
                f"them (for one text too); for one row of them, keep its batch dimension: tokens[i:i + 1]"
            )
        if text.shape[-1] > context:
            # Only padding past the context (clip.tokenize's default 77 positions, for a model of a shorter
            # context) is dropped; texts that do not fit are an error, not silently cut.
            if text.is_meta or bool(text[:, context:].any()):
                # The longest text's own length (up to its last non-padding id), not the tensor's width
                longest = text.shape[-1] if text.is_meta else int(text.ne(0).nonzero()[:, -1].max()) + 1
                raise ValueError(
                    f"text has {longest} tokens, more than this model's context length {context}: tokenize "
                    f"with clip.tokenize(texts, context_length=model.context_length) (truncate=True cuts long texts)"
                )
            text = text[:, :context]
        # Features are read at the end-of-text token, which has the largest id in the vocabulary.
        eot = text.argmax(dim=-1)
        # Attention is causal, so positions after a sequence's end-of-text token never influence its
        # features: running only up to the batch's last end-of-text token gives the same result, and
        # captions are usually far shorter than the context. The length is rounded up to a multiple of 8
        # to keep matrix shapes friendly and limit how many shapes torch.compile sees.
        # Meta tensors (FLOP counting) have no values and an empty batch no longest caption: both keep their length,
        # and so do the texts of a torch.func transform (vmap, per-sample gradients), whose length cannot be read.
        as_openai = runs_as_openai(self.transformer, self.token_embedding, self.ln_final)
        if (trim and not _tracing() and not as_openai and text.shape[0] > 0 and not text.is_meta
                and not _inside_torch_func_transform(text)):
            text = text[:, : trimmed_text_length(eot, text.shape[-1])]
        length = text.shape[-1]
        dtype = self.text_projection.dtype
        x = self.token_embedding(text).to(dtype)  # NL -> NLD
        x = x + self.positional_embedding[:length].to(dtype)
        # The blocks take OpenAI's LND shape: a view of the batch-major tensor (see clip.transformer), no copy;
        # a contiguous one, as OpenAI's, for code that watches or changes them
        x = x.transpose(0, 1)
        if as_openai:
            x = self.ln_final(self.transformer(x.contiguous()).transpose(0, 1).contiguous())  # -> NLD, as OpenAI's
            x = x[torch.arange(x.shape[0], device=x.device), eot]  # -> N,width
        else:
            # Only the end-of-text tokens are read: the last block computes them alone
            x = self.ln_final(self.transformer.forward_at(x, eot))  # -> N,width
        features = x @ self.text_projection  # -> N,embed_dim
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_per_image [N_image, N_text], logits_per_text [N_text, N_image]): the cosine
        similarities times exp(logit_scale), plus `logit_bias` for a SigLIP model (a constant, which changes
        no softmax or ranking over them)."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        return logits_per_image, logits_per_image.t()


def _inside_torch_func_transform(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is wrapped by a torch.func transform (vmap, grad), whose values cannot be read (where
    torch lacks its private check, this says no, and vmap over texts raises as it did)."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the check: it would break the graph here
        return False
    return is_torch_func_wrapped(tensor)


def _tracing() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.jit.is_tracing() or (is_exporting is not None and is_exporting())


def trimmed_text_length(eot_positions: torch.Tensor, context_length: int) -> int:
    """How many positions `encode_text` runs for a batch: up to its last end-of-text token, rounded up."""
    last = int(eot_positions.max()) + 1
    return min(context_length, -(-last // TEXT_LENGTH_MULTIPLE) * TEXT_LENGTH_MULTIPLE)


def trim_text_batch(text: torch.Tensor) -> torch.Tensor:
    """The batch cut as `encode_text` would cut it; on CPU tensors before they go to the GPU, after which
    `encode_text(..., trim=False)` gives the same features without a device sync."""
    return text[:, : trimmed_text_length(text.argmax(dim=-1), text.shape[-1])]


def create_model(name_or_config: str | ModelConfig | dict) -> CLIP:
    """An untrained CLIP (initialised as `CLIP.init_parameters` says), from a released architecture's name or
    a config."""
    if isinstance(name_or_config, str):
        config = get_architecture(name_or_config)
    elif isinstance(name_or_config, dict):
        _refuse_unknown_keys(name_or_config)
        _refuse_missing_tables(name_or_config)
        config = ModelConfig.from_dict(name_or_config)
    elif isinstance(name_or_config, ModelConfig):
        config = name_or_config
    else:
        raise TypeError(f"expected an architecture name, a ModelConfig or a dict, got {type(name_or_config).__name__}")
    return CLIP(config)


def _refuse_unknown_keys(config: dict) -> None:
    """ModelConfig.from_dict reads only the keys it knows and ignores the rest: a misspelt one in a dict
    given here, {"activaton": "gelu"}, built the default model without a word."""
    known = [field.name for field in dataclasses.fields(ModelConfig)]
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown model config key {key!r}{hint}; a ModelConfig has {', '.join(known)}")


def _refuse_missing_tables(config: dict) -> None:
    """ModelConfig.from_dict needs embed_dim and both towers' dicts: {} failed with a bare KeyError('embed_dim'),
    and {"vision": 1} with KeyError('embed_dim') too, naming neither what was missing nor what a tower takes."""
    missing = [key for key in ("embed_dim", "vision", "text") if key not in config]
    if missing:
        raise TypeError(f"model config dict has no {', '.join(map(repr, missing))}: it needs embed_dim, vision and text "
                        "(activation is 'quick_gelu' unless given), e.g. clip.RELEASED_ARCHITECTURES['ViT-B/32']"
                        ".to_dict() with the values to change")
    for tower, fields_of in (("vision", "VisionConfig"), ("text", "TextConfig")):
        if not isinstance(config[tower], dict):
            raise TypeError(f"model config {tower!r} must be a dict of {fields_of} fields, got {config[tower]!r}")


def count_parameters(module: nn.Module) -> int:
    """Every parameter's elements, frozen ones included (a locked tower's count too)."""
    return sum(p.numel() for p in module.parameters())


def convert_to_half_precision(model: nn.Module) -> nn.Module:
    """In place: float16 for the weights that OpenAI's release stores in float16 (the matrix multiplies:
    convolutions, linear layers, attention input projections, `text_projection`, `visual.proj`); embeddings,
    LayerNorm, BatchNorm and `logit_scale` stay float32. Returns `model`. Attention modules of torch's own
    (`nn.MultiheadAttention`, which code written for openai/CLIP adds or swaps in) are converted as well, all
    their projections, as openai/CLIP's `convert_weights` does: their input projections left in float32
    beside a float16 output projection would fail in the forward pass."""
    for module in model.modules():
        names: list[str] = []
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            names = ["weight", "bias"]
        elif isinstance(module, (MultiheadSelfAttention, nn.MultiheadAttention)):
            names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                     "bias_v"]
        names += ["text_projection", "proj"]
        for name in names:
            parameter = getattr(module, name, None)
            if isinstance(parameter, nn.Parameter):
                parameter.data = parameter.data.half()
    return model


# openai/CLIP's name for it (its fp16 fine-tuning recipes call clip.model.convert_weights).
convert_weights = convert_to_half_precision


def build_model(state_dict: dict) -> CLIP:
    """openai/CLIP's `build_model`: the model that an OpenAI-layout `state_dict` holds (the architecture is
    inferred from the tensor shapes), in eval mode and, as openai/CLIP returns it, with the float16 weights
    of OpenAI's release (`convert_weights`); `.float()` it for float32 on a CPU."""
    from .loading import model_from_weights  # loading builds on this module
    from .weights_file import weights_from_state_dict

    return convert_weights(model_from_weights(weights_from_state_dict(state_dict), "the state dict given"))
