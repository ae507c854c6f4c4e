"""Pre-LN Transformer blocks shared by the text encoder and the Vision Transformer.

Parameter names follow OpenAI's checkpoints (`attn.in_proj_weight`, `mlp.c_fc`, `ln_1`, ...) so released
state dicts load with `strict=True`. Attention runs through `scaled_dot_product_attention` with one fused
QKV projection.

The modules work as openai/CLIP's do, for code written against them: tensors are sequence-first (L, N, D)
at every module boundary (prompt learners run `model.transformer` on their own embeddings; hooks on a block
or inside it, on `ln_1`, `attn`, `mlp.c_fc`, see OpenAI's shapes); `attn` is called like
`nn.MultiheadAttention` and returns its (output, weights) pair, so attention maps come from
`need_weights=True`; a block's `attention(x)` is the method that tools for dense features and attention
maps replace.

In memory, the model's own callers keep the residual stream batch-major, as the attention kernels want it:
they hand the blocks (L, N, D) views of contiguous (N, L, D) tensors (`batch_major_memory`), and each module
works on the contiguous tensor behind such a view and returns a view again, so no layout copy is made in
the forward or the backward pass. (Sequence-major memory would cost the attention a copy of its output
forward and of its gradient backward, in every block.) A contiguous (L, N, D) tensor, as code written for
openai/CLIP passes it, works too, with those copies. The MLP of a block with hooks on it runs on the view as
given (a copy), so that its hooks see OpenAI's shapes as well.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_internals  # where torch keeps the global module hooks
from torch.utils.checkpoint import checkpoint


def batch_major_memory(x: torch.Tensor) -> bool:
    """Whether an (L, N, D) tensor is the transposed view of a contiguous (N, L, D) one, the layout the model's
    own callers hand the blocks (see the module docstring). Work on it runs on `x.transpose(0, 1)`."""
    return x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous()


def refuse_scripting(module: nn.Module) -> nn.Module:
    """`__prepare_scriptable__` of this library's modules, which torch.jit.script calls on every module before
    compiling it: their forwards choose a code path in Python (hooks, replaced methods, train or eval mode, the
    text batch's length), which TorchScript cannot compile, and its own error named a line deep inside
    ("method 'forward' is called recursively", "Unknown type constructor Iterable"). Says what works instead."""
    raise RuntimeError(
        f"torch.jit.script cannot compile clip's {type(module).__name__}: the model chooses its code path in Python. "
        f"Trace it instead, with example inputs: torch.jit.trace(module, inputs), for a CLIP model "
        f"torch.jit.trace_module(model, {{'encode_image': (images,), 'encode_text': (texts,)}}) -- or use "
        f"torch.export.export (ONNX: torch.onnx.export). A traced text tower runs every position of the context, "
        f"so it fits any batch of texts."
    )


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, so half-precision weights (OpenAI's GPU default) stay stable."""

    __prepare_scriptable__ = refuse_scripting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if batch_major_memory(x):  # it normalises each row: on the contiguous tensor behind the view, no copy
            return self.forward(x.transpose(0, 1)).transpose(0, 1)
        if x.dtype == torch.float32:
            return super().forward(x)
        if self._half_input_under_autocast(x):
            # Mixed-precision training (the ViT's residual stream is half precision under autocast): the
            # half-precision kernel, which accumulates its statistics in float32 anyway, with the gain and
            # bias cast as autocast casts every linear layer's weights. The float32 route below would add
            # two activation-sized casts in the forward pass and two in the backward for each LayerNorm.
            with torch.autocast(x.device.type, enabled=False):
                weight = None if self.weight is None else self.weight.to(x.dtype)
                bias = None if self.bias is None else self.bias.to(x.dtype)
                return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        # At least float32: half precision is computed in float32, float64 (reference computations, gradient
        # checks) stays float64 rather than being rounded to float32 at every LayerNorm.
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps).to(x.dtype)

    def _half_input_under_autocast(self, x: torch.Tensor) -> bool:
        if self.weight is not None and self.weight.dtype != torch.float32:
            return False  # half-precision weights (OpenAI's models): OpenAI's float32 arithmetic, exactly
        return autocast_enabled_for(x)


def autocast_enabled_for(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device; only asked for devices with an autocast mode (not "meta")."""
    return x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)


QUICK_GELU_SCALE = 1.702


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's released models were trained with:
    x * sigmoid(1.702 * x)."""

    __prepare_scriptable__ = refuse_scripting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written as silu(1.702 * x) / 1.702, the same function: SiLU is one kernel whose backward needs only
        # its input, so autograd keeps one hidden-sized tensor per block instead of two (x and the sigmoid),
        # and the backward pass is one kernel instead of four. The division may be in place: SiLU's backward
        # does not read its output.
        return F.silu(x * QUICK_GELU_SCALE).div_(QUICK_GELU_SCALE)


_OWN_QUICK_GELU_FORWARD = QuickGELU.forward


def quick_gelu_mlp(x: torch.Tensor, c_fc: nn.Linear, c_proj: nn.Linear) -> torch.Tensor:
    """c_proj(QuickGELU(c_fc(x))) with QuickGELU's two constants folded into the weights:
    x * sigmoid(1.702 x) = silu(1.702 x) / 1.702, and the scalings commute with the linear maps, so
    c_fc's weight and bias are scaled by 1.702 and c_proj's weight by 1 / 1.702. The activation is then a
    single SiLU: two elementwise passes over the hidden-sized tensor (4x the width, the largest in a block)
    fewer forward, and two fewer backward, in exchange for scaling four weight-sized tensors (a 768-wide
    block's hidden tensor at batch 256 and 197 tokens is 64x the size of its c_fc weight). The features
    equal the unfolded form's up to float rounding."""
    bias = None if c_fc.bias is None else c_fc.bias * QUICK_GELU_SCALE  # a caller may have dropped it
    hidden = F.silu(F.linear(x, c_fc.weight * QUICK_GELU_SCALE, bias))
    return F.linear(hidden, c_proj.weight * (1 / QUICK_GELU_SCALE), c_proj.bias)


def has_hooks(*modules: nn.Module, count_global: bool = True) -> bool:
    """Whether a forward or backward hook would run for any of `modules`: their own, or (`count_global`) one
    registered for every module (torch.nn.modules.module.register_module_forward_hook and kin)."""
    global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                    "_global_backward_pre_hooks")
    if count_global and any(getattr(module_internals, name, None) for name in global_hooks):
        return True
    own_hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(m, name, None) for m in modules for name in own_hooks)


def make_activation(name: str) -> nn.Module:
    activations = {"quick_gelu": QuickGELU, "gelu": nn.GELU}
    if name not in activations:
        raise ValueError(f"activation must be one of {sorted(activations)}, got {name!r}")
    return activations[name]()


def renamed_argument(name: str, value: object, openai_name: str, openai_value: object) -> object:
    """An argument that openai/CLIP's constructor names differently (`n_head` for `heads`): given once,
    by either name."""
    if value is not None and openai_value is not None:
        raise TypeError(f"got both {name!r} and {openai_name!r}, openai/CLIP's name for it")
    if value is None and openai_value is None:
        raise TypeError(f"missing required argument {name!r} (or {openai_name!r}, openai/CLIP's name for it)")
    return value if openai_value is None else openai_value


def causal_mask(length: int) -> torch.Tensor:
    """OpenAI's additive causal mask [length, length]: -inf above the diagonal (a position attends to itself
    and earlier ones), 0 elsewhere. Always made on the CPU, as OpenAI's (code that reads it moves it), also
    when the model is built on the meta device (`clip.load` does), where it would stay unreadable."""
    return torch.full((length, length), float("-inf"), device="cpu").triu_(1)


class MultiheadSelfAttention(nn.MultiheadAttention):
    """Self-attention with a fused QKV projection, with `nn.MultiheadAttention`'s parameters, attributes and
    call (`attn(x, x, x, need_weights=False, attn_mask=mask)` -> (output, weights or None), sequence-first),
    fast for self-attention (key and value the query itself, or None); other keys and values take
    nn.MultiheadAttention's own forward.

    An `nn.MultiheadAttention` (a subclass, with its own forward), as the module in openai/CLIP's blocks is:
    code that finds a model's attention layers by `isinstance(module, nn.MultiheadAttention)` (LoRA and
    adapter libraries replacing them, attention-map tools) finds these."""

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, width: int, heads: int, *, initialise: bool = True) -> None:
        # nn.Module's constructor, not nn.MultiheadAttention's: that one draws the initial weights itself,
        # which `initialise=False` must not do; the attributes it would set are set here, to its values.
        nn.Module.__init__(self)
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.embed_dim = self.kdim = self.vdim = width
        self._qkv_same_embed_dim = True
        self.num_heads = heads
        self.head_dim = width // heads
        self.dropout = 0.0
        self.batch_first = False
        self.add_zero_attn = False
        self.bias_k = self.bias_v = None
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            self.register_parameter(name, None)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's initialisation, so that a block or Transformer built on its own (as code written
        # for openai/CLIP builds extra layers) starts from usable weights. CLIP sets its own in init_parameters
        # and builds its blocks with initialise=False, so that a seeded model draws what it always has.
        if initialise:
            nn.init.xavier_uniform_(self.in_proj_weight)
            nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query: (L, N, D). attn_mask: (L, L) or (N * heads, L, L), additive floats or booleans (True: not
        attended), as nn.MultiheadAttention's; a larger square mask (OpenAI's context-sized one for a shorter
        sequence) is cut to L. is_causal: the mask is the causal one, and the causal kernel runs instead
        (None is accepted as well). need_weights: also return the attention weights, (N, L, L) averaged over
        the heads or (N, heads, L, L); they are computed explicitly, so the fast kernels are not used."""
        key = query if key is None else key
        value = query if value is None else value
        if key is not query or value is not query:
            # Cross-attention (code that reuses a pretrained layer's weights on other keys, as attention-pooling and
            # dense-prediction tools do): nn.MultiheadAttention's own forward, on these same parameters
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        length, n, width = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        batch_major = batch_major_memory(query)
        # q, k and v are views of the one projection's output, split along its own "3" dimension and only then
        # permuted to N,H,L,d. Backward then stacks their gradients straight into the projection output's
        # layout, which the weight and input gradients read as it is: one copy. Moving the "3" to the front
        # first made backward stack them in the front-"3" layout and then copy that into the output's (two).
        # unbind, not three indexings: each of those would fill a zero tensor the size of qkv and add them up.
        if batch_major:  # the model's own layout: the heads come out of the contiguous NLD tensor as views
            qkv = F.linear(query.transpose(0, 1), self.in_proj_weight, self.in_proj_bias)  # -> NL(3D)
            q, k, v = (t.transpose(1, 2) for t in qkv.view(n, length, 3, heads, head_dim).unbind(2))  # N,H,L,d
        else:
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # -> LN(3D)
            q, k, v = (t.permute(1, 2, 0, 3) for t in qkv.view(length, n, 3, heads, head_dim).unbind(2))  # N,H,L,d
        # The causal kernel needs no mask, unless padding is to be left out as well
        causal_kernel = is_causal and key_padding_mask is None
        if is_causal and not causal_kernel:
            attn_mask = causal_mask(length)  # what is_causal declares attn_mask to be
        mask = None if causal_kernel else self._additive_mask(attn_mask, key_padding_mask, length, n, q.dtype, q.device)
        if need_weights:
            scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)  # N,H,L,L
            if causal_kernel:
                mask = causal_mask(length).to(q.device, q.dtype)
            weights = (scores if mask is None else scores + mask).softmax(dim=-1)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal_kernel)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if batch_major and not has_hooks(self.out_proj):
            # N,H,L,d -> NLD is a view of the kernel's output; the result goes back as an LND view
            return self.out_proj(out.transpose(1, 2).reshape(n, length, width)).transpose(0, 1), weights
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(length, n, width)), weights  # -> LND (a copy)

    def attend_from(self, x: torch.Tensor, positions: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """The attention output at one position per sequence: x (L, N, D) as `forward` takes it, positions (N,)
        -> (N, D), which is `forward(x, x, x, need_weights=False, is_causal=is_causal)[0][positions, arange(N)]`
        computed for those N queries alone. Keys and values still come from every position; the queries and
        the output projection run on N rows instead of L x N."""
        length, n, width = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        rows = x.transpose(0, 1)  # N,L,D: the contiguous tensor behind the model's own (batch-major) layout
        query_weight, key_value_weight = self.in_proj_weight.split([width, 2 * width])
        query_bias, key_value_bias = self.in_proj_bias.split([width, 2 * width])
        key_value = F.linear(rows, key_value_weight, key_value_bias)  # -> N,L,2D
        # split before permuting, as in forward: backward stacks the two gradients in key_value's own layout
        k, v = (t.transpose(1, 2) for t in key_value.view(n, length, 2, heads, head_dim).unbind(2))  # N,H,L,d each
        queries = rows[torch.arange(n, device=x.device), positions]  # -> N,D
        q = F.linear(queries, query_weight, query_bias).view(n, heads, 1, head_dim)
        mask = None
        if is_causal:  # each query attends to its own position and the earlier ones (True: attended)
            mask = (torch.arange(length, device=x.device) <= positions.unsqueeze(1)).view(n, 1, 1, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # -> N,H,1,d
        return self.out_proj(out.reshape(n, width))

    def _additive_mask(
        self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, length: int, n: int,
        dtype: torch.dtype, device: torch.device,
    ) -> torch.Tensor | None:
        """attn_mask and key_padding_mask as one additive mask broadcastable to (N, H, L, L), or None."""
        mask = None
        if attn_mask is not None:
            if attn_mask.shape[-1] > length and attn_mask.shape[-2] == attn_mask.shape[-1]:
                attn_mask = attn_mask[..., :length, :length]
            mask = _as_additive(attn_mask, dtype, device)
            if mask.dim() == 3:  # (N * heads, L, L), as nn.MultiheadAttention takes it
                mask = mask.view(n, self.num_heads, length, length)
        if key_padding_mask is not None:  # (N, L): True (or -inf) for keys to leave out
            padding = _as_additive(key_padding_mask, dtype, device).view(n, 1, 1, length)
            mask = padding if mask is None else mask + padding
        return mask


_OWN_ATTENTION_FORWARD = MultiheadSelfAttention.forward


def forward_replaced(module: nn.Module, own_forward: Callable | None = None) -> bool:
    """Whether outside code replaced `module`'s `forward`: on the module (`module.forward = ...`, as tools that
    wrap modules or read attention maps do), or, given the class's `own_forward` as written, on its class."""
    return "forward" in vars(module) or (own_forward is not None and type(module).forward is not own_forward)


def attention_forward_replaced(attn: nn.Module) -> bool:
    """Whether outside code replaced a MultiheadSelfAttention's `forward` (on the module, as attention-map tools
    do to ask for need_weights=True, or on its class): the block must then call it for every position."""
    return forward_replaced(attn, _OWN_ATTENTION_FORWARD)


def _as_additive(mask: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(mask.to(device), float("-inf"))
    return mask.to(device=device, dtype=dtype)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block on (L, N, D): x + attention(ln_1(x)), then + mlp(ln_2(x)).

    attn_mask: OpenAI's additive mask, or None. causal: declares it the causal mask (the text encoder's; each
    position attends to itself and earlier ones), so the causal attention kernel runs and the mask itself
    is only there for code that reads it (`attention` replaced by OpenAI-style code); a mask assigned in its
    place (None for bidirectional attention, as some prompt learners do) is applied as given, as in openai/CLIP.
    The built mask edited in place (`block.attn_mask.zero_()`, as openai/CLIP code may) counts as replaced too,
    by its version counter, outside torch.compile's tracing (reading the counter there broke the graph at every
    block; a compiled model keeps the mask it was compiled with)."""

    __prepare_scriptable__ = refuse_scripting

    def __init__(
        self, width: int | None = None, heads: int | None = None, attn_mask: torch.Tensor | None = None, *,
        mlp_ratio: float = 4.0, activation: str = "quick_gelu", causal: bool = False, initialise: bool = True,
        d_model: int | None = None, n_head: int | None = None,
    ) -> None:
        super().__init__()
        width = renamed_argument("width", width, "d_model", d_model)
        heads = renamed_argument("heads", heads, "n_head", n_head)
        if causal and attn_mask is None:
            raise ValueError("a causal block needs its attn_mask (causal_mask(context_length))")
        hidden = int(width * mlp_ratio)
        self.attn_mask = attn_mask  # a plain attribute, as OpenAI's: not in the state dict
        self.causal = causal
        # The causal kernel stands for this mask only: code written for openai/CLIP that sets its own
        # attn_mask (None for bidirectional text attention, a custom one) gets that mask applied instead.
        self._built_attn_mask = attn_mask
        self._built_attn_mask_version = _version_of(attn_mask)
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads, initialise=initialise)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", make_activation(activation)),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.attn) is MultiheadSelfAttention:
            is_causal = self.causal and not attn_mask_replaced(self)
            return self.attn(x, x, x, need_weights=False, attn_mask=self.attn_mask, is_causal=is_causal)[0]
        # A replaced attention module (nn.MultiheadAttention, an attention-map recorder) is called as OpenAI's
        # blocks call theirs, with the mask on x's device and dtype
        mask = None if self.attn_mask is None else self.attn_mask.to(dtype=x.dtype, device=x.device)
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (L, N, D) -> (L, N, D). positions: (N,), one position per sequence, the only outputs read (the class
        token, the end-of-text token: `Transformer.forward_at`): then (N, D), `forward(x)[positions, arange(N)]`.
        Only attention's keys and values need every position for those; the queries, the output projection and
        the MLP (10 of a block's 12 width-squared matrix products per position) run on the N positions alone.
        A block that outside code changed (another attention mask or module, replaced methods, hooks) runs
        whole, and its output is indexed."""
        if positions is not None:
            return self._forward_at(x, positions)
        x = x + self.attention(self.ln_1(x))
        x = x + self.feed_forward(self.ln_2(x))
        return x

    def _forward_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch = torch.arange(x.shape[1], device=x.device)
        if not self._attends_from_positions():
            return self.forward(x)[positions, batch]
        rows = x[positions, batch] + self.attn.attend_from(self.ln_1(x), positions, is_causal=self.causal)
        return rows + self.feed_forward(self.ln_2(rows))

    def runs_own_code(self) -> bool:
        """Whether the block runs this module's own attention and methods: none replaced on the instance, its
        class or its attention (code that replaces them may rely on anything OpenAI's block does)."""
        if type(self.attn) is not MultiheadSelfAttention or attention_forward_replaced(self.attn):
            return False
        if "attention" in vars(self) or "forward" in vars(self):
            return False
        return (type(self).attention, type(self).forward) == _OWN_BLOCK_METHODS

    def _attends_from_positions(self) -> bool:
        """Whether the read positions may be computed alone: this class's own methods and attention, no hooks,
        and the causal mask it was built with or no mask."""
        # Hooks registered for every module are not counted: they belong to tools that watch the whole program
        # (FlopCounterMode), which must see it run as it does
        if has_hooks(*self.modules(), count_global=False) or not self.runs_own_code():
            return False
        if self.causal:
            return not attn_mask_replaced(self)
        return self.attn_mask is None

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        observed = has_hooks(*self.mlp.modules())  # the MLP and its layers: asked once per call
        if batch_major_memory(x) and not observed:
            # Row by row: on the contiguous tensor behind the view (hooks would see it batch-first, so an
            # observed MLP runs on the view as given, in OpenAI's shapes, at the cost of a copy)
            return self._mlp(x.transpose(0, 1), observed).transpose(0, 1)
        return self._mlp(x, observed)

    def _mlp(self, x: torch.Tensor, observed: bool) -> torch.Tensor:
        if self._folds_quick_gelu(x, observed):
            return quick_gelu_mlp(x, self.mlp.c_fc, self.mlp.c_proj)
        return self.mlp(x)

    def _folds_quick_gelu(self, x: torch.Tensor, observed: bool) -> bool:
        # The folded form's one cost: for backward, each linear keeps its scaled weight instead of the
        # parameter itself, a weight-sized copy. Under autocast a (half-precision) copy is kept either way,
        # and in eval mode (inference) nothing is usually kept; float32 training would pay (~0.3 GB for
        # ViT-B/32), so it runs the module as written. Decided by train/eval mode rather than by grad mode,
        # so that gradient accumulation's no-grad caching pass computes exactly what its gradient pass does.
        # Half-precision weights (OpenAI's models on a GPU) are not folded either: scaling them rounds each
        # weight again, and their features should match OpenAI's to the last bit. Nor are replaced or
        # wrapped layers (adapters), or layers with hooks (attribution tools, pruning), which the folded form
        # would bypass (`observed`: hooks on the MLP or its layers): only plain, unobserved nn.Linear weights
        # can be scaled like this.
        # The MLP must also still be the three layers it was built with, with QuickGELU (a block built with
        # exact GELU has nothing to fold), and run their own forwards: a swapped activation, an appended module
        # or a `forward` replaced on one of them (`module.forward = ...`, as tools that wrap modules set it, or
        # QuickGELU's on its class) would otherwise be silently skipped.
        mlp = self.mlp
        if not (isinstance(mlp, nn.Sequential) and list(mlp._modules) == ["c_fc", "gelu", "c_proj"]):
            return False
        c_fc, gelu, c_proj = mlp.c_fc, mlp.gelu, mlp.c_proj
        if not (type(gelu) is QuickGELU and type(c_fc) is nn.Linear and type(c_proj) is nn.Linear):
            return False
        if forward_replaced(gelu, _OWN_QUICK_GELU_FORWARD) or any(forward_replaced(m) for m in (mlp, c_fc, c_proj)):
            return False
        if observed:
            return False
        if c_fc.weight.dtype != torch.float32:
            return False
        return not self.training or autocast_enabled_for(x)


_OWN_BLOCK_METHODS = (ResidualAttentionBlock.attention, ResidualAttentionBlock.forward)


def _version_of(mask: torch.Tensor | None) -> int | None:
    """The mask's in-place version counter; None for no mask, or one made in inference mode (which has none)."""
    if mask is None or mask.is_inference():
        return None
    return mask._version


def attn_mask_replaced(block: ResidualAttentionBlock) -> bool:
    """Whether outside code set a causal block's `attn_mask` to another one than it was built with, or edited
    the built one in place."""
    if not block.causal:
        return False
    built = getattr(block, "_built_attn_mask", None)
    if block.attn_mask is not built:
        return True
    if built is None or torch.compiler.is_compiling():
        return False
    if built.is_inference():
        # Made under torch.inference_mode: no version counter, so its values are compared (a CPU tensor of
        # context x context, as `causal_mask` makes it: no device sync)
        return built.device.type != "cpu" or not torch.equal(built, causal_mask(built.shape[-1]).to(built.dtype))
    return _version_of(built) != getattr(block, "_built_attn_mask_version", None)


def runs_as_openai(transformer: nn.Module, *around: nn.Module) -> bool:
    """Whether code from outside watches or changes `transformer` (or the modules `around` it): a hook on any
    of their modules (not one registered for every module), a block whose `attention` or `forward` method was
    replaced (on the block or its class), a replaced `attn` module or its `forward`, a replaced block, a causal
    block's replaced `attn_mask`, or a replaced `transformer` (another module, or a subclass with its own
    `forward`). The model then runs that tower exactly as openai/CLIP's does -- contiguous sequence-first
    tensors, every position of every block -- since such code may rely on any of it (`.view` on a block's
    tensors, OpenAI's 77 x 77 mask added to its own scores), at the cost of the layout copies, the text
    trimming and the last block's read-positions-only computation (`Transformer.forward_at`) it otherwise
    saves."""
    if not isinstance(transformer, Transformer) or type(transformer).forward is not Transformer.forward:
        return True
    # Hooks on these modules themselves: hooks registered for every module belong to tools that watch the
    # whole program (FlopCounterMode's module tracker, memory trackers), which must see it run as it does
    modules = (*transformer.modules(), *(module for outer in around for module in outer.modules()))
    if has_hooks(*modules, count_global=False):
        return True
    for block in getattr(transformer, "resblocks", ()):
        if not isinstance(block, ResidualAttentionBlock) or not block.runs_own_code():
            return True
        if attn_mask_replaced(block):  # with another mask than the causal one, positions past the end of text count
            return True
    return False


class Transformer(nn.Module):
    """A stack of residual attention blocks on (L, N, D) tensors, built as openai/CLIP's
    (`Transformer(width, layers, heads, attn_mask)`); see `ResidualAttentionBlock` for the rest."""

    __prepare_scriptable__ = refuse_scripting

    def __init__(
        self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None, *,
        mlp_ratio: float = 4.0, activation: str = "quick_gelu", causal: bool = False, initialise: bool = True,
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        # Trades compute for memory: each block's activations are recomputed in the backward pass.
        self.grad_checkpointing = False
        self.resblocks = nn.Sequential(
            *[
                ResidualAttentionBlock(
                    width, heads, attn_mask, mlp_ratio=mlp_ratio, activation=activation, causal=causal,
                    initialise=initialise,
                )
                for _ in range(layers)
            ]
        )

    def init_parameters(self) -> None:
        # openai/CLIP's scheme for its text transformer (GPT-2 style): residual output projections are scaled
        # down with depth so the residual stream's variance stays bounded. Biases start at zero.
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: LND, as OpenAI's Transformer
        for block in self.resblocks:
            x = self._run(block, x)
        return x

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The output at one position per sequence (the class token, the end-of-text token): x (L, N, D),
        positions (N,) -> (N, D), which is `forward(x)[positions, arange(N)]`. The last block computes those
        positions alone (`ResidualAttentionBlock.forward` with `positions`), as nothing reads its other
        outputs: for 12 layers, about 10/12 of one block's matrix products, 7% of the tower's, in training and
        in inference."""
        if len(self.resblocks) == 0:
            return x[positions, torch.arange(x.shape[1], device=x.device)]
        *lower, last = self.resblocks
        if not (isinstance(last, ResidualAttentionBlock) and last._attends_from_positions()):
            # A block replaced or changed by outside code (hooks, another mask): run whole, as it expects
            return self.forward(x)[positions, torch.arange(x.shape[1], device=x.device)]
        for block in lower:
            x = self._run(block, x)
        return self._run(last, x, positions)

    def _run(self, block: nn.Module, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        arguments = (x,) if positions is None else (x, positions)
        # Each block's own mode: a partly locked tower trains its top blocks, the others stay in eval mode
        if self.grad_checkpointing and block.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing recomputes exactly one block and works with autocast and DDP.
            return checkpoint(block, *arguments, use_reentrant=False)
        return block(*arguments)
