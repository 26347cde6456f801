"""FedMEPD segmentation network: one encoder per MRI modality, anchor cross-attention and a fusion decoder (3D).

Implements the network of

    Liu et al., "Federated Modality-specific Encoders and Partially Personalized Fusion Decoder for Multimodal Brain
    Tumor Segmentation" (FedMEPD), arXiv:2603.04887; authors' code: github.com/ccarliu/FedMEPD (read for the rules
    and shapes, not copied).

Setting: brain MRI with four modalities (FLAIR, T1ce, T1, T2), of which each site has only some; the server holds a
small full-modal labelled set. The parts of the network and how the method treats them:

- ``encoders.<modality>.*``: one small 3D convolutional encoder per modality (multi-scale features). Shared, but
  averaged only over the sites that have that modality (``fedoap.methods.fedmepd_rules.owner_mean``). An encoder runs
  only on the samples whose modality is present; an absent modality contributes nothing (and gets no gradient).
- fusion: at every scale the features of the present modalities are averaged (mean over the present encoders, per
  sample). No parameters. (The authors fuse with RFNet's region-aware modal fusion inside the decoder; the masked mean
  is the simpler fusion of HeMIS-style models and keeps the fused space a function of the shared encoders only.)
- ``anchors.*``: multi-scale class anchors, non-trainable buffers ``anchors.scale_<s>`` of shape
  ``(anchor_classes, anchors_per_class, channels[s])`` (background first, then the ``out_channels`` regions; the
  authors use 4 classes x 4 k-means clusters per scale) and ``anchors.initialized`` (a 0-d bool). The server computes
  them by k-means on its full-modal fused features (:meth:`FedMEPDNet.features`) and sends them; they are set with
  :meth:`FedMEPDNet.set_anchors`, never averaged like weights.
- ``attention.scale_<s>.*``: per scale an :class:`AnchorCrossAttention`: the fused features (queries, one token per
  voxel) attend to that scale's anchors (keys and values), and the result is added back to the features (residual),
  which makes up for the missing modalities with what the full-modal anchors carry. Local to the site (the authors'
  attention layers are personal and the server model does not use them); skipped when the anchors are not set or
  when ``use_anchors=False`` (the server's own model).
- ``decoder.*``: a 3D UNet-style fusion decoder with skip connections from the (attended) fused multi-scale
  features, ending in a 1x1x1 ``decoder.head`` that gives ``out_channels`` logits (WT/TC/ET as three sigmoid
  channels). Shared, with per-filter personalization: :meth:`FedMEPDNet.decoder_filter_groups` lists, for every
  decoder convolution, its state-dict keys and the dimension that indexes its output filters.

Every constructor argument is stored unchanged as an attribute of the same name (the job exporter re-creates the
model from its attributes).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from monai.networks.nets.basic_unet import Down, TwoConv, UpCat

__all__ = [
    "BRATS_MODALITIES",
    "AnchorCrossAttention",
    "FedMEPDNet",
    "FilterGroup",
    "ModalityEncoder",
]

#: the four BraTS modalities in the channel order of the input volume
BRATS_MODALITIES: tuple[str, ...] = ("flair", "t1ce", "t1", "t2")


class FilterGroup(NamedTuple):
    """One decoder convolution as a set of filters (output channels).

    ``members`` pairs each state-dict key of the layer (its weight, its bias and the affine parameters of a
    normalisation that directly follows it, if any) with the dimension of that tensor that indexes the output
    filters (0 for a convolution's weight and for every bias, 1 for a transposed convolution's weight). Filter ``i``
    of the layer is the slice ``i`` along that dimension of every member.
    """

    name: str
    members: tuple[tuple[str, int], ...]
    filters: int


def _is_positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


class ModalityEncoder(nn.Module):
    """
    The 3D encoder of one modality: ``TwoConv(1, c0)`` then ``Down(c_{s-1}, c_s)`` (max-pool 2, two convolutions)
    for every further width; returns the feature map of every scale (full resolution first).

    Args:
        channels: widths of the scales, at least 2 of them.
        act, norm: MONAI factory specs of the activation and normalisation.
        dropout: dropout rate inside the convolution blocks.

    Example::

        >>> enc = ModalityEncoder((8, 16, 32))
        >>> [f.shape[1:] for f in enc(torch.randn(1, 1, 16, 16, 16))]
        [torch.Size([8, 16, 16, 16]), torch.Size([16, 8, 8, 8]), torch.Size([32, 4, 4, 4])]
    """

    def __init__(self, channels: Sequence[int], act: str | tuple, norm: str | tuple, dropout: float = 0.0) -> None:
        super().__init__()
        widths = [int(c) for c in channels]
        self.stages = nn.ModuleDict({"conv_0": TwoConv(3, 1, widths[0], act, norm, True, dropout)})
        for s in range(1, len(widths)):
            self.stages[f"down_{s}"] = Down(3, widths[s - 1], widths[s], act, norm, True, dropout)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages.values():
            x = stage(x)
            features.append(x)
        return features


class AnchorCrossAttention(nn.Module):
    """
    Cross-attention from a 3D feature map to a set of anchors (class prototypes), added back to the features.

    Every voxel of ``features`` ``(B, C, H, W, D)`` is a query token; the ``A`` anchors ``(A, C)`` (the same for the
    whole batch) give the keys and values. With linear projections ``W_Q, W_K, W_V, W_O`` and ``heads`` heads of
    width ``d = C / heads``::

        out = features + W_O softmax(Q K^T / sqrt(d)) V        (per head, softmax over the anchors)

    As in the authors' code, the linear weights start from N(0, 0.001^2) and the biases at 0, so that the block starts
    close to the identity.

    Args:
        channels: channels ``C`` of the features and of the anchors.
        heads: number of heads; must divide ``channels``. Defaults to 1.

    Raises:
        ValueError: if ``channels`` or ``heads`` is not a positive integer or ``heads`` does not divide ``channels``.
    """

    def __init__(self, channels: int, heads: int = 1) -> None:
        super().__init__()
        if not _is_positive_int(channels):
            raise ValueError(f"channels must be a positive integer, got {channels!r}.")
        if not _is_positive_int(heads) or int(channels) % int(heads) != 0:
            raise ValueError(f"heads must be a positive integer that divides channels ({channels}), got {heads!r}.")
        self.channels = channels
        self.heads = heads
        c = int(channels)
        self.head_dim = c // int(heads)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.Linear(c, c)
        for layer in (self.to_q, self.to_k, self.to_v, self.to_out):
            nn.init.normal_(layer.weight, std=1e-3)
            nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: ``(B, C, H, W, D)``.
            anchors: ``(A, C)`` (or any shape ``(..., C)``, flattened to ``(A, C)``).

        Returns:
            ``(B, C, H, W, D)``: the features plus the attended anchors.
        """
        b, c = features.shape[:2]
        spatial = features.shape[2:]
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, C)
        anchors = anchors.reshape(-1, c).to(dtype=features.dtype)
        h, d = int(self.heads), self.head_dim
        q = self.to_q(tokens).reshape(b, -1, h, d).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(anchors).reshape(-1, h, d).transpose(0, 1)  # (h, A, d)
        v = self.to_v(anchors).reshape(-1, h, d).transpose(0, 1)  # (h, A, d)
        attention = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)  # (B, h, N, A)
        context = torch.matmul(attention, v).transpose(1, 2).reshape(b, -1, c)  # (B, N, C)
        out = self.to_out(context).transpose(1, 2).reshape(b, c, *spatial)
        return features + out


class FedMEPDNet(nn.Module):
    """
    FedMEPD network (Liu et al., arXiv:2603.04887): modality-specific 3D encoders, masked-mean fusion, anchor
    cross-attention at every scale and a shared fusion decoder with per-filter personalization (see the module
    docstring for the parts and how the method shares them).

    Layout (``c_0..c_{S-1} = channels``, input ``(B, in_modalities, H, W, D)``)::

        encoders.<m>.stages.conv_0   TwoConv(1, c_0)        H        one encoder per modality m
        encoders.<m>.stages.down_s   Down(c_{s-1}, c_s)     H/2^s
        fused_s = mean over the present modalities of encoder features at scale s
        attention.scale_s            fused_s + CrossAttn(fused_s -> anchors.scale_s)   (LOCAL; when anchors are set)
        decoder.upcat_s              UpCat(c_s -> c_{s-1}), skip = attended fused_{s-1}, s = S-1 .. 1
        decoder.head                 Conv1x1x1(c_0 -> out_channels)   logits (sigmoid per region)

    Convolution blocks use instance normalisation without affine parameters and LeakyReLU(0.2), as the authors'
    ``general_conv3d`` (so the state dict has no norm entries and no buffers other than the anchors).

    Args:
        in_modalities: number of input modalities (channels of ``x``). Defaults to 4.
        out_channels: number of output logits. Defaults to 3 (WT, TC, ET).
        channels: widths of the scales (at least 2). Defaults to ``(8, 16, 32, 64)`` (CPU size); the authors use
            ``(16, 32, 64, 128)``.
        modality_names: one name per input channel, used in the state-dict keys ``encoders.<name>.*``. Defaults to
            ``("flair", "t1ce", "t1", "t2")`` for 4 modalities and ``("m0", "m1", ...)`` otherwise.
        anchor_classes: number of anchor classes. Defaults to ``out_channels + 1`` (background and every region).
        anchors_per_class: number of anchors (k-means clusters) per class and scale. Defaults to 4 (the authors').
        heads: attention heads per scale; must divide every width. Defaults to 1.
        anchor_attention: whether the forward pass uses the anchor attention once anchors are set (True for a site;
            the server's model, trained on full-modal data, passes ``use_anchors=False`` or is built with False).
        dropout: dropout rate inside the convolution blocks, in ``[0, 1)``. Defaults to 0.

    Raises:
        ValueError: on an invalid argument (see the checks in ``__init__``).

    Example::

        >>> net = FedMEPDNet(channels=(4, 8, 16))
        >>> x = torch.randn(2, 4, 16, 16, 16)
        >>> net(x, present=torch.tensor([True, False, True, False])).shape
        torch.Size([2, 3, 16, 16, 16])
        >>> [a.shape for a in net.anchor_tensors()]
        [torch.Size([4, 4, 4]), torch.Size([4, 4, 8]), torch.Size([4, 4, 16])]
    """

    act: tuple = ("leakyrelu", {"negative_slope": 0.2, "inplace": False})
    norm_layer: tuple = ("instance", {"affine": False})

    def __init__(
        self,
        in_modalities: int = 4,
        out_channels: int = 3,
        channels: Sequence[int] = (8, 16, 32, 64),
        modality_names: Sequence[str] | None = None,
        anchor_classes: int | None = None,
        anchors_per_class: int = 4,
        heads: int = 1,
        anchor_attention: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not _is_positive_int(in_modalities):
            raise ValueError(f"in_modalities must be a positive integer, got {in_modalities!r}.")
        if not _is_positive_int(out_channels):
            raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}.")
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or len(channels) < 2:
            raise ValueError(f"channels must be a sequence of at least 2 integers, got {channels!r}.")
        if not all(_is_positive_int(c) and int(c) >= 2 for c in channels):
            raise ValueError(f"every entry of channels must be an integer >= 2, got {channels!r}.")
        if modality_names is None:
            names = BRATS_MODALITIES if int(in_modalities) == 4 else tuple(f"m{i}" for i in range(int(in_modalities)))
        else:
            names = tuple(modality_names)
            if isinstance(modality_names, (str, bytes)) or len(names) != int(in_modalities):
                raise ValueError(f"modality_names must name the {in_modalities} modalities, got {modality_names!r}.")
            if not all(isinstance(n, str) and n.isidentifier() for n in names) or len(set(names)) != len(names):
                raise ValueError(f"modality_names must be distinct identifiers, got {modality_names!r}.")
        if anchor_classes is not None and not _is_positive_int(anchor_classes):
            raise ValueError(f"anchor_classes must be None or a positive integer, got {anchor_classes!r}.")
        if not _is_positive_int(anchors_per_class):
            raise ValueError(f"anchors_per_class must be a positive integer, got {anchors_per_class!r}.")
        if not _is_positive_int(heads) or any(int(c) % int(heads) for c in channels):
            raise ValueError(f"heads must be a positive integer that divides every width {channels!r}, got {heads!r}.")
        if not isinstance(anchor_attention, bool):
            raise ValueError(f"anchor_attention must be True or False, got {anchor_attention!r}.")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}.")

        # constructor arguments, stored unchanged
        self.in_modalities = in_modalities
        self.out_channels = out_channels
        self.channels = channels
        self.modality_names = modality_names
        self.anchor_classes = anchor_classes
        self.anchors_per_class = anchors_per_class
        self.heads = heads
        self.anchor_attention = anchor_attention
        self.dropout = dropout

        self.modalities: tuple[str, ...] = names
        widths = [int(c) for c in channels]
        self.n_scales = len(widths)
        self.n_anchor_classes = int(out_channels) + 1 if anchor_classes is None else int(anchor_classes)
        act, norm, drop = self.act, self.norm_layer, float(dropout)

        self.encoders = nn.ModuleDict({m: ModalityEncoder(widths, act, norm, drop) for m in names})
        self.attention = nn.ModuleDict(
            {f"scale_{s}": AnchorCrossAttention(w, heads=int(heads)) for s, w in enumerate(widths)}
        )
        self.anchors = nn.Module()
        for s, w in enumerate(widths):
            self.anchors.register_buffer(f"scale_{s}", torch.zeros(self.n_anchor_classes, int(anchors_per_class), w))
        self.anchors.register_buffer("initialized", torch.tensor(False))
        decoder: dict[str, nn.Module] = {}
        for s in range(self.n_scales - 1, 0, -1):
            decoder[f"upcat_{s}"] = UpCat(3, widths[s], widths[s - 1], widths[s - 1], act, norm, True, drop)
        decoder["head"] = nn.Conv3d(widths[0], int(out_channels), kernel_size=1)
        self.decoder = nn.ModuleDict(decoder)
        # the modalities a site holds, used when forward/features get no ``present`` (not state: set by the site)
        self.default_present: tuple[bool, ...] | None = None

    # ------------------------------------------------------------------ key naming
    def encoder_keys(self, modality: str) -> list[str]:
        """Sorted state-dict keys of one modality's encoder (all start with ``encoders.<modality>.``).

        Raises:
            ValueError: an unknown modality name.
        """
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; the network has {list(self.modalities)}.")
        prefix = f"encoders.{modality}."
        return sorted(k for k in self.state_dict() if k.startswith(prefix))

    def modality_keys(self) -> dict[str, list[str]]:
        """``{modality: encoder_keys(modality)}`` for every modality (the argument of ``owner_mean``)."""
        return {m: self.encoder_keys(m) for m in self.modalities}

    @property
    def decoder_keys(self) -> list[str]:
        """Sorted state-dict keys of the fusion decoder (``decoder.*``)."""
        return sorted(k for k in self.state_dict() if k.startswith("decoder."))

    @property
    def shared_keys(self) -> list[str]:
        """Sorted keys the server aggregates: every encoder (by owners) and the decoder (per-filter personalized)."""
        return sorted(k for k in self.state_dict() if k.startswith(("encoders.", "decoder.")))

    @property
    def local_keys(self) -> list[str]:
        """Sorted keys that never leave the site: the anchor attention blocks (``attention.*``)."""
        return sorted(k for k in self.state_dict() if k.startswith("attention."))

    @property
    def anchor_keys(self) -> list[str]:
        """Sorted keys of the anchor buffers (``anchors.*``), set from the server, never averaged."""
        return sorted(k for k in self.state_dict() if k.startswith("anchors."))

    def decoder_filter_groups(self) -> list[FilterGroup]:
        """
        Every convolution of the decoder (in module order) as a :class:`FilterGroup`: its weight and bias keys with
        the dimension of each that indexes the output filters (a transposed convolution's weight is
        ``(in, out, k, k, k)``: dimension 1), plus the affine parameters of a normalisation that directly follows
        it. Together the groups cover every ``decoder.*`` key exactly once.
        """
        groups: list[FilterGroup] = []
        current: tuple[str, list[tuple[str, int]], int] | None = None
        for name, module in self.decoder.named_modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                if current is not None:
                    groups.append(FilterGroup(current[0], tuple(current[1]), current[2]))
                transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
                if transposed and module.groups != 1:
                    raise ValueError(f"grouped transposed convolution decoder.{name} is not supported.")
                members = [(f"decoder.{name}.weight", 1 if transposed else 0)]
                if module.bias is not None:
                    members.append((f"decoder.{name}.bias", 0))
                current = (f"decoder.{name}", members, int(module.out_channels))
            elif current is not None and isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                for pname, param in module.named_parameters(recurse=False):
                    if param.shape[0] != current[2]:
                        raise ValueError(f"decoder.{name}.{pname} does not follow the filters of {current[0]}.")
                    current[1].append((f"decoder.{name}.{pname}", 0))
        if current is not None:
            groups.append(FilterGroup(current[0], tuple(current[1]), current[2]))
        return groups

    # ------------------------------------------------------------------ anchors
    def anchor_tensors(self) -> list[torch.Tensor]:
        """The anchor buffers, one ``(anchor_classes, anchors_per_class, channels[s])`` tensor per scale."""
        return [getattr(self.anchors, f"scale_{s}") for s in range(self.n_scales)]

    @property
    def anchors_initialized(self) -> bool:
        """Whether anchors were set (:meth:`set_anchors`, or a state dict with ``anchors.initialized`` True)."""
        return bool(self.anchors.initialized)

    def set_anchors(self, anchors: Sequence[torch.Tensor]) -> None:
        """
        Copy the server's anchors into the buffers and mark them initialized.

        Args:
            anchors: one tensor per scale, of shape ``(anchor_classes, anchors_per_class, channels[s])``.

        Raises:
            ValueError: a wrong number of scales, a wrong shape or a non-finite value.
        """
        if len(anchors) != self.n_scales:
            raise ValueError(f"expected anchors for {self.n_scales} scales, got {len(anchors)}.")
        buffers = self.anchor_tensors()
        for s, (given, buf) in enumerate(zip(anchors, buffers)):
            if tuple(given.shape) != tuple(buf.shape):
                raise ValueError(f"anchors of scale {s} must have shape {tuple(buf.shape)}, got {tuple(given.shape)}.")
            if not torch.isfinite(given).all():
                raise ValueError(f"anchors of scale {s} are not finite.")
        with torch.no_grad():
            for given, buf in zip(anchors, buffers):
                buf.copy_(given.to(dtype=buf.dtype, device=buf.device))
            self.anchors.initialized.fill_(True)

    # ------------------------------------------------------------------ forward
    def set_default_present(self, present: Sequence[bool] | None) -> None:
        """
        The modalities this site holds, used whenever ``forward``/``features`` get ``present=None`` (so that a
        generic training loop that calls ``model(x)`` never runs the encoder of a modality the site lacks). None:
        all present. A plain attribute, not in the state dict.

        Raises:
            ValueError: not one bool per modality, or none present.
        """
        if present is None:
            self.default_present = None
            return
        mask = tuple(bool(p) for p in present)
        if len(mask) != int(self.in_modalities) or not any(mask):
            raise ValueError(f"present must give {self.in_modalities} flags with at least one True, got {present!r}.")
        self.default_present = mask

    def _present_mask(self, x: torch.Tensor, present: torch.Tensor | Sequence[bool] | None) -> torch.Tensor:
        """``present`` as a ``(B, in_modalities)`` bool tensor on ``x``'s device (None: :attr:`default_present`, or
        all present)."""
        b, m = x.shape[0], int(self.in_modalities)
        if present is None:
            present = self.default_present
        if present is None:
            return torch.ones(b, m, dtype=torch.bool, device=x.device)
        mask = torch.as_tensor(present, device=x.device)
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("present must be a bool mask (or integers 0/1).")
            mask = mask.bool()
        if mask.ndim == 1 and mask.shape[0] == m:
            mask = mask.unsqueeze(0).expand(b, m)
        if tuple(mask.shape) != (b, m):
            raise ValueError(f"present must have shape ({m},) or ({b}, {m}), got {tuple(mask.shape)}.")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every sample needs at least one present modality.")
        return mask

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != int(self.in_modalities):
            raise ValueError(f"expected input of shape (B, {self.in_modalities}, H, W, D), got {tuple(x.shape)}.")
        factor = 2 ** (self.n_scales - 1)
        if any(int(n) % factor for n in x.shape[2:]):
            raise ValueError(f"H, W and D must be divisible by {factor}, got shape {tuple(x.shape)}.")
        if math.prod(int(n) // factor for n in x.shape[2:]) <= 1:
            raise ValueError(
                f"the deepest scale must have more than one voxel (instance norm), got shape {tuple(x.shape)}."
            )

    def features(
        self, x: torch.Tensor, present: torch.Tensor | Sequence[bool] | None = None
    ) -> list[torch.Tensor]:
        """
        The fused multi-scale features: at every scale, the mean over the present modalities of their encoders'
        features (before the anchor attention; what the server clusters into anchors).

        Args:
            x: ``(B, in_modalities, H, W, D)``; the channels of absent modalities are never read.
            present: ``(in_modalities,)`` or ``(B, in_modalities)`` bool mask; None: :attr:`default_present` (all
                present unless a site set it).

        Returns:
            one ``(B, channels[s], H / 2^s, W / 2^s, D / 2^s)`` tensor per scale.
        """
        self._check_input(x)
        mask = self._present_mask(x, present)
        fused: list[torch.Tensor | None] = [None] * self.n_scales
        for m, name in enumerate(self.modalities):
            rows = torch.nonzero(mask[:, m], as_tuple=False).flatten()
            if rows.numel() == 0:
                continue  # nobody has this modality: its encoder does not run (no gradient, no compute)
            if rows.numel() == x.shape[0]:
                outputs = self.encoders[name](x[:, m : m + 1])
            else:
                outputs = self.encoders[name](x.index_select(0, rows)[:, m : m + 1])
            for s, feat in enumerate(outputs):
                if rows.numel() != x.shape[0]:
                    feat = feat.new_zeros((x.shape[0], *feat.shape[1:])).index_add(0, rows, feat)
                fused[s] = feat if fused[s] is None else fused[s] + feat
        count = mask.sum(dim=1).to(x.dtype).reshape(-1, 1, 1, 1, 1)
        return [f / count for f in fused]  # type: ignore[operator]

    def forward(
        self,
        x: torch.Tensor,
        present: torch.Tensor | Sequence[bool] | None = None,
        use_anchors: bool | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``(B, in_modalities, H, W, D)`` with ``H, W, D`` divisible by ``2^(len(channels) - 1)``.
            present: which modalities each sample has, ``(in_modalities,)`` or ``(B, in_modalities)`` bool; None:
                :attr:`default_present` (all unless set). An absent modality's channel is not read and its encoder
                gets no gradient from that sample.
            use_anchors: apply the anchor attention; None (default): iff ``anchor_attention`` and the anchors are
                set. True with anchors not set raises.

        Returns:
            logits ``(B, out_channels, H, W, D)``.

        Raises:
            ValueError: a wrong input shape, a bad ``present`` mask, a sample without any modality, or
                ``use_anchors=True`` before anchors were set.
        """
        if use_anchors is None:
            use_anchors = self.anchor_attention and self.anchors_initialized
        elif use_anchors and not self.anchors_initialized:
            raise ValueError("use_anchors=True but no anchors were set (set_anchors).")
        fused = self.features(x, present)
        if use_anchors:
            anchors = self.anchor_tensors()
            fused = [self.attention[f"scale_{s}"](f, anchors[s]) for s, f in enumerate(fused)]
        u = fused[-1]
        for s in range(self.n_scales - 1, 0, -1):
            u = self.decoder[f"upcat_{s}"](u, fused[s - 1])
        return self.decoder["head"](u)

    # ------------------------------------------------------------------ state helpers
    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """The entries of :attr:`shared_keys` (detached tensors that share storage with the model)."""
        keys = set(self.shared_keys)
        return {k: v for k, v in self.state_dict().items() if k in keys}

    def load_shared_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """
        Copy shared entries into the model (a subset is allowed: the encoder of a modality nobody has is absent from
        an owner-mean aggregate); local and anchor entries are untouched.

        Raises:
            ValueError: a key that is not shared (a local, anchor or unknown key).
        """
        extra = set(state_dict) - set(self.shared_keys)
        if extra:
            raise ValueError(f"not shared keys in the shared state dict: {sorted(extra)}.")
        self.load_state_dict(dict(state_dict), strict=False)
