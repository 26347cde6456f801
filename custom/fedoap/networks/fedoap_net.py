"""FedOAP segmentation network: a 2D UNet with Decoupled Cross-Attention and a local spatial adapter.

Implements the model of

    Tashdeed, Rahman, Islam, Hossain, "Personalized Federated Segmentation with Shared Feature
    Aggregation and Boundary-Focused Calibration" (FedOAP), arXiv:2511.18847.

The network is split into *shared* parameters (averaged by the federated server) and *local*
parameters (kept on each client). Which parameters are shared is a named partition, see
:data:`SHARED_PARTITIONS`; the local query path (``query_branch``, ``dca.to_q``), the spatial
adapter (``adapter``) and the output layer (``head``) are never shared under any partition
(:data:`LOCAL_ONLY_PREFIXES`).
"""

from __future__ import annotations

import math
import numbers
import types
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from monai.networks.blocks import Convolution
from monai.networks.layers.utils import get_act_layer
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat

__all__ = [
    "SHARED_PARTITIONS",
    "LOCAL_ONLY_PREFIXES",
    "DecoupledCrossAttention",
    "SpatialAdapter",
    "FedOAPNet",
]

#: Module-name prefixes whose parameters (and buffers) are shared with the server, per partition.
#: A state-dict key is shared iff it equals a prefix or starts with ``prefix + "."``.
#:
#: - ``"authors"``: the partition of the paper: everything except the local query path
#:   (``query_branch``, ``dca.to_q``), the spatial adapter and the output head. That is the
#:   encoder, the key/value bottleneck branch, the key/value/output projections and the
#:   normalisation of the attention block, and the decoder.
#: - ``"kv_only"``: a minimal partition that shares only what produces the global key/value
#:   pairs: ``kv_branch``, ``dca.to_k`` and ``dca.to_v``. Everything else stays on the client.
#:
#: The mapping is read-only; the prefixes are listed positively so that a module added later is
#: local (never leaked to the server) until it is added here on purpose.
SHARED_PARTITIONS: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {
        "authors": ("encoder", "kv_branch", "dca.to_k", "dca.to_v", "dca.to_out", "dca.norm", "decoder"),
        "kv_only": ("kv_branch", "dca.to_k", "dca.to_v"),
    }
)

#: Module-name prefixes that are local under every partition (the personalised part of FedOAP).
LOCAL_ONLY_PREFIXES: tuple[str, ...] = ("query_branch", "dca.to_q", "adapter", "head")


def _matches_prefix(key: str, prefix: str) -> bool:
    """Whether ``key`` lies under module ``prefix`` (dotted boundary, not a substring match)."""
    return key == prefix or key.startswith(prefix + ".")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


def _group_count(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is at most ``max_groups`` (``min(32, channels)`` when it divides)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class DecoupledCrossAttention(nn.Module):
    """
    Decoupled Cross-Attention (DCA) of FedOAP (Tashdeed et al., arXiv:2511.18847).

    Queries come from the client's local bottleneck features, keys and values from the
    bottleneck features of the shared (federated) branch. Every spatial position of the
    ``(h, w)`` feature map is one token (``h * w`` tokens). With ``Q = W_Q x_q``,
    ``K = W_K x_kv`` and ``V = W_V x_kv`` (1x1 convolutions, split into ``heads`` heads of size
    ``d_head = attention_dim / heads``)::

        A   = softmax(Q^T K / sqrt(d_head))        # (tokens_q, tokens_kv) per head, rows sum to 1
        out = GroupNorm(W_O (V A^T) + x_q)          # W_O: 1x1 convolution, residual on the queries

    ``to_q`` belongs to the local query path; ``to_k``, ``to_v`` produce the shared key/value pairs.

    Args:
        channels: number of channels of both input feature maps and of the output.
        attention_dim: total width of the query/key/value projections. Defaults to ``channels``.
        heads: number of attention heads; must divide the attention width. Defaults to 1 (as in the paper).
        num_groups: number of groups of the output GroupNorm. Defaults to the largest divisor of
            ``channels`` that is at most 32 (``min(32, channels)`` whenever that divides ``channels``).

    Raises:
        ValueError: if ``channels``, ``attention_dim``, ``heads`` or ``num_groups`` is not a positive
            integer, if ``heads`` does not divide the attention width, or if ``num_groups`` does not
            divide ``channels``.

    Example::

        >>> dca = DecoupledCrossAttention(channels=256, heads=1)
        >>> q, kv = torch.randn(2, 256, 8, 8), torch.randn(2, 256, 8, 8)
        >>> dca(q, kv).shape
        torch.Size([2, 256, 8, 8])
        >>> dca(q, kv, return_attention=True)[1].shape  # (batch, heads, tokens, tokens)
        torch.Size([2, 1, 64, 64])
    """

    def __init__(
        self, channels: int, attention_dim: int | None = None, heads: int = 1, num_groups: int | None = None
    ) -> None:
        super().__init__()
        if not _is_positive_int(channels):
            raise ValueError(f"channels must be a positive integer, got {channels!r}.")
        if attention_dim is not None and not _is_positive_int(attention_dim):
            raise ValueError(f"attention_dim must be None or a positive integer, got {attention_dim!r}.")
        if not _is_positive_int(heads):
            raise ValueError(f"heads must be a positive integer, got {heads!r}.")
        inner_dim = int(channels if attention_dim is None else attention_dim)
        if inner_dim % int(heads) != 0:
            raise ValueError(f"heads ({heads}) must divide the attention width ({inner_dim}).")
        if num_groups is not None and not _is_positive_int(num_groups):
            raise ValueError(f"num_groups must be None or a positive integer, got {num_groups!r}.")
        groups = _group_count(int(channels)) if num_groups is None else int(num_groups)
        if int(channels) % groups != 0:
            raise ValueError(f"num_groups ({num_groups}) must divide channels ({channels}).")

        self.channels = channels
        self.attention_dim = attention_dim
        self.heads = heads
        self.num_groups = num_groups
        self.inner_dim = inner_dim
        self.head_dim = inner_dim // int(heads)
        self.scale = 1.0 / math.sqrt(self.head_dim)

        self.to_q = nn.Conv2d(int(channels), inner_dim, kernel_size=1)
        self.to_k = nn.Conv2d(int(channels), inner_dim, kernel_size=1)
        self.to_v = nn.Conv2d(int(channels), inner_dim, kernel_size=1)
        self.to_out = nn.Conv2d(inner_dim, int(channels), kernel_size=1)
        self.norm = nn.GroupNorm(groups, int(channels))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads * d_head, h, w) -> (B, heads, d_head, h * w)."""
        return x.reshape(x.shape[0], int(self.heads), self.head_dim, x.shape[2] * x.shape[3])

    def forward(
        self, query_features: torch.Tensor, kv_features: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            query_features: local features ``(B, channels, h, w)``; source of the queries and of the residual.
            kv_features: shared-branch features ``(B, channels, h, w)``; source of the keys and values.
            return_attention: also return the attention map ``(B, heads, h*w, h*w)`` (rows: query tokens).

        Raises:
            ValueError: if the two inputs do not have the same 4D shape with ``channels`` channels.
        """
        if query_features.ndim != 4 or query_features.shape != kv_features.shape:
            raise ValueError(
                "query_features and kv_features must be 4D tensors of the same shape, got "
                f"{tuple(query_features.shape)} and {tuple(kv_features.shape)}."
            )
        if query_features.shape[1] != int(self.channels):
            raise ValueError(f"expected {self.channels} input channels, got shape {tuple(query_features.shape)}.")
        b, _, h, w = query_features.shape
        q = self._split_heads(self.to_q(query_features))
        k = self._split_heads(self.to_k(kv_features))
        v = self._split_heads(self.to_v(kv_features))
        attention = torch.softmax(torch.matmul(q.transpose(-1, -2), k) * self.scale, dim=-1)
        context = torch.matmul(v, attention.transpose(-1, -2)).reshape(b, self.inner_dim, h, w)
        out = self.norm(self.to_out(context) + query_features)
        if return_attention:
            return out, attention
        return out


class SpatialAdapter(nn.Module):
    """
    Client-specific spatial adapter of FedOAP (Tashdeed et al., arXiv:2511.18847).

    A residual block applied to the full-resolution decoder output::

        y = ReLU( IN(Conv3x3(ReLU(IN(Conv3x3 x)))) + IN(Conv1x1 x) )

    with affine instance normalisation (IN) and non-inplace activations. It is always local.

    Args:
        channels: number of input and output channels.
        act: activation type and arguments (MONAI factory format). Defaults to non-inplace ReLU.
        norm: normalisation type and arguments (MONAI factory format). Defaults to affine instance norm.
        bias: whether the convolutions have a bias term. Defaults to True.

    Raises:
        ValueError: if ``channels`` is not a positive integer.

    Example::

        >>> adapter = SpatialAdapter(16)
        >>> adapter(torch.randn(2, 16, 64, 64)).shape
        torch.Size([2, 16, 64, 64])
    """

    def __init__(
        self,
        channels: int,
        act: str | tuple = ("relu", {"inplace": False}),
        norm: str | tuple = ("instance", {"affine": True}),
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not _is_positive_int(channels):
            raise ValueError(f"channels must be a positive integer, got {channels!r}.")
        self.channels = channels
        self.act = act
        self.norm = norm
        self.bias = bias
        c = int(channels)
        self.conv_1 = Convolution(2, c, c, kernel_size=3, act=act, norm=norm, bias=bias)
        self.conv_2 = Convolution(2, c, c, kernel_size=3, act=None, norm=norm, bias=bias)
        self.skip = Convolution(2, c, c, kernel_size=1, act=None, norm=norm, bias=bias)
        self.out_act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_act(self.conv_2(self.conv_1(x)) + self.skip(x))


class FedOAPNet(nn.Module):
    """
    FedOAP segmentation network (Tashdeed et al., arXiv:2511.18847): a 2D UNet whose bottleneck is
    a Decoupled Cross-Attention between a local query branch and a shared key/value branch,
    followed by a local spatial adapter and a local 1x1 output head.

    Layout (``c0..c3 = channels``, ``cb = bottleneck_channels``, input ``H x W``)::

        encoder.conv_0  TwoConv(in, c0)           H      (skip)
        encoder.down_1  Down(c0, c1)              H/2    (skip)
        encoder.down_2  Down(c1, c2)              H/4    (skip)
        encoder.down_3  Down(c2, c3)              H/8    (skip, deepest encoder map)
        query_branch    Down(c3, cb)   LOCAL      H/16   -> queries
        kv_branch       Down(c3, cb)   shared     H/16   -> keys, values
        dca             DecoupledCrossAttention(cb); tokens = (H/16) * (W/16)
        decoder.upcat_4 UpCat(cb -> c3), upcat_3 (c3 -> c2), upcat_2 (c2 -> c1), upcat_1 (c1 -> c0)
        adapter         SpatialAdapter(c0)  LOCAL
        head            Conv1x1(c0 -> out)  LOCAL, logits

    All convolution blocks use affine instance normalisation (no running statistics, hence no
    buffers in the state dict) and non-inplace ReLU, so that the model can be wrapped by Opacus.
    The normalisation is the class attribute :attr:`norm_layer` (a MONAI factory spec), so that a
    baseline that is defined by its normalisation layer uses a subclass that changes only that
    (``fedoap.networks.norm_variants``: BatchNorm for SioBN, Population Normalization for PN).
    Convolutions keep a bias term, as in MONAI's ``BasicUNet``.

    Which parameters are averaged by the server is chosen by ``partition`` (see
    :data:`SHARED_PARTITIONS`); :attr:`shared_keys`, :attr:`local_keys`, :meth:`shared_state_dict`,
    :meth:`load_shared_state_dict` and :meth:`is_shared_key` expose it.

    Every constructor argument is stored unchanged as an attribute of the same name, so that the
    model can be re-created from its attributes (e.g. by an NVIDIA FLARE job exporter).

    Args:
        in_channels: number of input channels. Defaults to 1.
        out_channels: number of output logits (1 for binary segmentation). Defaults to 1.
        channels: four encoder widths ``(c0, c1, c2, c3)``. Defaults to ``(16, 32, 64, 128)``
            (a CPU-sized model); the paper uses ``(64, 128, 256, 512)``.
        bottleneck_channels: width ``cb`` of both bottleneck branches and of the attention block.
            Defaults to 256; the paper uses 1024.
        attention_dim: width of the query/key/value projections. Defaults to ``bottleneck_channels``.
        heads: number of attention heads; must divide the attention width. Defaults to 1 (paper).
        partition: name of the shared/local partition, a key of :data:`SHARED_PARTITIONS`.
            Defaults to ``"authors"``.
        dropout: dropout rate inside the UNet convolution blocks, in ``[0, 1)``. Defaults to 0.
        use_cross_attention: the decoupled cross-attention bottleneck (True, the paper); False is the ablation
            "without DCA": the key/value branch alone is a plain UNet bottleneck (no ``query_branch``, no ``dca``).
        use_adapter: the local spatial adapter before the head (True, the paper); False (ablation) feeds the
            decoder output to the head directly.

    Raises:
        ValueError: if ``channels`` is not a sequence of four integers ``>= 2``, if
            ``bottleneck_channels < 2``, if ``in_channels``, ``out_channels`` or ``heads`` is not a
            positive integer, if ``attention_dim`` is neither None nor a positive integer, if
            ``heads`` does not divide the attention width, if ``partition`` is unknown, or if
            ``dropout`` is not in ``[0, 1)``.

    Example::

        >>> net = FedOAPNet(in_channels=1, out_channels=1)                       # CPU size
        >>> paper = FedOAPNet(channels=(64, 128, 256, 512), bottleneck_channels=1024)
        >>> net(torch.randn(2, 1, 128, 128)).shape
        torch.Size([2, 1, 128, 128])
        >>> global_part = net.shared_state_dict()   # send to the server
        >>> net.load_shared_state_dict(global_part)  # receive the aggregate
    """

    #: normalisation of every convolution block and of the adapter (MONAI ``Norm`` factory spec); the
    #: attention block keeps its GroupNorm. Variants override it (``fedoap.networks.norm_variants``).
    norm_layer: tuple = ("instance", {"affine": True})

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        bottleneck_channels: int = 256,
        attention_dim: int | None = None,
        heads: int = 1,
        partition: str = "authors",
        dropout: float = 0.0,
        use_cross_attention: bool = True,
        use_adapter: bool = True,
    ) -> None:
        super().__init__()
        if not _is_positive_int(in_channels):
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}.")
        if not _is_positive_int(out_channels):
            raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}.")
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or len(channels) != 4:
            raise ValueError(f"channels must be a sequence of 4 integers (c0, c1, c2, c3), got {channels!r}.")
        if not all(_is_positive_int(c) and int(c) >= 2 for c in channels):
            raise ValueError(f"every entry of channels must be an integer >= 2, got {channels!r}.")
        if not (_is_positive_int(bottleneck_channels) and int(bottleneck_channels) >= 2):
            raise ValueError(f"bottleneck_channels must be an integer >= 2, got {bottleneck_channels!r}.")
        if attention_dim is not None and not _is_positive_int(attention_dim):
            raise ValueError(f"attention_dim must be None or a positive integer, got {attention_dim!r}.")
        if not _is_positive_int(heads):
            raise ValueError(f"heads must be a positive integer, got {heads!r}.")
        attn_width = int(bottleneck_channels if attention_dim is None else attention_dim)
        if attn_width % int(heads) != 0:
            raise ValueError(f"heads ({heads}) must divide the attention width ({attn_width}).")
        if not isinstance(partition, str) or partition not in SHARED_PARTITIONS:
            raise ValueError(f"unknown partition {partition!r}; available: {sorted(SHARED_PARTITIONS)}.")
        for flag, value in (("use_cross_attention", use_cross_attention), ("use_adapter", use_adapter)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}.")
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, numbers.Real)
            or not 0.0 <= float(dropout) < 1.0
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}.")

        # constructor arguments, stored unchanged (the exporter re-creates the model from these)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.bottleneck_channels = bottleneck_channels
        self.attention_dim = attention_dim
        self.heads = heads
        self.partition = partition
        self.dropout = dropout
        self.use_cross_attention = use_cross_attention
        self.use_adapter = use_adapter

        act = ("relu", {"inplace": False})
        norm = self.norm_layer
        bias = True
        drop = float(dropout)
        c0, c1, c2, c3 = (int(c) for c in channels)
        cb = int(bottleneck_channels)

        self.encoder = nn.ModuleDict(
            {
                "conv_0": TwoConv(2, int(in_channels), c0, act, norm, bias, drop),
                "down_1": Down(2, c0, c1, act, norm, bias, drop),
                "down_2": Down(2, c1, c2, act, norm, bias, drop),
                "down_3": Down(2, c2, c3, act, norm, bias, drop),
            }
        )
        self.kv_branch = Down(2, c3, cb, act, norm, bias, drop)
        if use_cross_attention:
            self.query_branch = Down(2, c3, cb, act, norm, bias, drop)
            self.dca = DecoupledCrossAttention(cb, attention_dim=attn_width, heads=int(heads))
        self.decoder = nn.ModuleDict(
            {
                "upcat_4": UpCat(2, cb, c3, c3, act, norm, bias, drop),
                "upcat_3": UpCat(2, c3, c2, c2, act, norm, bias, drop),
                "upcat_2": UpCat(2, c2, c1, c1, act, norm, bias, drop),
                "upcat_1": UpCat(2, c1, c0, c0, act, norm, bias, drop),
            }
        )
        self.adapter = SpatialAdapter(c0, act=act, norm=norm, bias=bias) if use_adapter else nn.Identity()
        self.head = nn.Conv2d(c0, int(out_channels), kernel_size=1)

    # ------------------------------------------------------------------ partition
    @staticmethod
    def is_shared_key(key: str, partition: str) -> bool:
        """
        Whether state-dict ``key`` is shared with the server under ``partition``.

        A key is shared iff it lies under one of the partition's module prefixes on a dotted
        boundary (``"dca.to_k"`` matches ``"dca.to_k.weight"`` but not ``"dca.to_kx.weight"``).

        Raises:
            ValueError: if ``partition`` is not a key of :data:`SHARED_PARTITIONS`.
        """
        if partition not in SHARED_PARTITIONS:
            raise ValueError(f"unknown partition {partition!r}; available: {sorted(SHARED_PARTITIONS)}.")
        return any(_matches_prefix(key, prefix) for prefix in SHARED_PARTITIONS[partition])

    @property
    def shared_keys(self) -> list[str]:
        """Sorted state-dict keys shared with the server under ``self.partition``."""
        return sorted(k for k in self.state_dict() if self.is_shared_key(k, self.partition))

    @property
    def local_keys(self) -> list[str]:
        """Sorted state-dict keys kept on the client under ``self.partition``."""
        return sorted(k for k in self.state_dict() if not self.is_shared_key(k, self.partition))

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """The shared entries of :meth:`state_dict` (detached tensors that share storage with the model)."""
        return {k: v for k, v in self.state_dict().items() if self.is_shared_key(k, self.partition)}

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """The local entries of :meth:`state_dict` (detached tensors that share storage with the model)."""
        return {k: v for k, v in self.state_dict().items() if not self.is_shared_key(k, self.partition)}

    def load_shared_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """
        Copy the shared entries (e.g. the server aggregate) into the model; local entries are untouched.

        Raises:
            ValueError: if ``state_dict`` contains a key that is not shared under ``self.partition``
                (in particular any local key) or lacks one of :attr:`shared_keys`.
        """
        expected = set(self.shared_keys)
        given = set(state_dict)
        if given != expected:
            raise ValueError(
                f"shared state dict mismatch for partition {self.partition!r}: "
                f"unexpected keys {sorted(given - expected)}, missing keys {sorted(expected - given)}."
            )
        self.load_state_dict(dict(state_dict), strict=False)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: images ``(B, in_channels, H, W)`` with ``H`` and ``W`` divisible by 16 and
                ``(H/16) * (W/16) > 1`` (so not 16 x 16).

        Returns:
            logits ``(B, out_channels, H, W)``.

        Raises:
            ValueError: if ``x`` is not 4D, has the wrong number of channels, ``H``/``W`` is not
                divisible by 16, or the input is only 16 x 16 (a single token).
        """
        if x.ndim != 4 or x.shape[1] != int(self.in_channels):
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}."
            )
        if x.shape[2] % 16 != 0 or x.shape[3] % 16 != 0:
            raise ValueError(f"input height and width must be divisible by 16, got shape {tuple(x.shape)}.")
        if x.shape[2] * x.shape[3] <= 16 * 16:
            raise ValueError(
                "input must give more than one attention token ((H/16) * (W/16) > 1; instance norm of the "
                f"bottleneck needs more than one spatial element), got shape {tuple(x.shape)}."
            )
        x0 = self.encoder["conv_0"](x)
        x1 = self.encoder["down_1"](x0)
        x2 = self.encoder["down_2"](x1)
        x3 = self.encoder["down_3"](x2)
        if self.use_cross_attention:
            fused = self.dca(self.query_branch(x3), self.kv_branch(x3))
        else:  # ablation: a plain UNet bottleneck (the key/value branch alone)
            fused = self.kv_branch(x3)
        u = self.decoder["upcat_4"](fused, x3)
        u = self.decoder["upcat_3"](u, x2)
        u = self.decoder["upcat_2"](u, x1)
        u = self.decoder["upcat_1"](u, x0)
        return self.head(self.adapter(u))
