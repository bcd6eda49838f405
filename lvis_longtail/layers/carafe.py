"""CARAFE: Content-Aware ReAssembly of FEatures (Wang et al., ICCV 2019), in tensor code,
and its content-aware downsampling counterpart (:class:`CARAFEDown`).

Upsampling by ``scale`` where every output pixel l' is a weighted sum of the k_up x k_up
neighbourhood of its source pixel l = floor(l' / scale), with weights predicted from the
content:

* kernel prediction: a 1x1 *channel compressor* (C -> C_m), a k_enc x k_enc *content
  encoder* (C_m -> scale^2 k_up^2), *pixel shuffle* (scale^2 k_up^2 channels at H x W ->
  k_up^2 at scale H x scale W) and a *softmax* over the k_up^2 weights of each output pixel;
* reassembly: ``unfold`` gathers every source pixel's neighbourhood (zero padded), and each
  output pixel takes the weighted sum of its source's neighbourhood.

Memory: the unfolded input is C k_up^2 H W values (25x the input for k_up 5).

An empty batch (N = 0, a mask head without foreground RoIs) gives an empty output whose
backward reaches every parameter (zero gradients), as DDP needs: the pixel shuffle is a
reshape and permute (:func:`pixel_shuffle`), since torch's ``pixel_shuffle`` backward returns
a wrongly shaped gradient for N = 0.
"""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CARAFE", "CARAFEDown", "pixel_shuffle"]


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``F.pixel_shuffle`` as a reshape and permute, whose backward is also right for an
    empty batch: (N, C s^2, H, W) -> (N, C, s H, s W), input channel ``c s^2 + i s + j``
    going to output pixel ``(s h + i, s w + j)`` of channel c."""
    n, cs2, h, w = x.shape
    c = cs2 // (scale * scale)
    x = x.reshape(n, c, scale, scale, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c, h * scale, w * scale)


class CARAFE(nn.Module):
    """Content-aware upsampling; output channels = input channels.

    Args:
        channels: C.
        scale: upsampling factor (2 for FPN and the mask head).
        compressed_channels: C_m of the channel compressor (64 in the paper).
        encoder_kernel: k_enc of the content encoder (3).
        up_kernel: k_up, the reassembly neighbourhood (5).
    """

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        compressed_channels: int = 64,
        encoder_kernel: int = 3,
        up_kernel: int = 5,
    ):
        super().__init__()
        if up_kernel % 2 == 0 or encoder_kernel % 2 == 0:
            raise ValueError(f"CARAFE kernels must be odd, got up {up_kernel}, "
                             f"encoder {encoder_kernel}")  # fmt: skip
        self.scale, self.up_kernel = int(scale), int(up_kernel)
        self.compressor = nn.Conv2d(channels, compressed_channels, 1)
        self.encoder = nn.Conv2d(
            compressed_channels,
            self.scale**2 * self.up_kernel**2,
            encoder_kernel,
            padding=encoder_kernel // 2,
        )
        nn.init.xavier_uniform_(self.compressor.weight)
        nn.init.zeros_(self.compressor.bias)
        nn.init.normal_(self.encoder.weight, std=1e-3)  # near-uniform kernels at start
        nn.init.zeros_(self.encoder.bias)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, k_up^2, scale H, scale W) reassembly kernels, each summing to
        1 over its k_up^2 weights (row-major over the neighbourhood)."""
        k = pixel_shuffle(self.encoder(self.compressor(x)), self.scale)
        return k.softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, scale H, scale W)."""
        return reassemble(x, self.kernels(x), self.scale)


def reassemble(x: torch.Tensor, kernels: torch.Tensor, scale: int) -> torch.Tensor:
    """CARAFE's reassembly: (N, C, H, W) features and (N, k^2, sH, sW) kernels ->
    (N, C, sH, sW), output (i, j) = sum over the k x k neighbourhood of (i // s, j // s)."""
    n, c, h, w = x.shape
    k2 = kernels.shape[1]
    k = int(round(k2**0.5))
    neighbours = F.unfold(x, k, padding=k // 2).view(n, c, k2, h, w)
    kernels = kernels.view(n, k2, h, scale, w, scale)
    out = torch.einsum("nckhw,nkhawb->nchawb", neighbours, kernels)
    return out.reshape(n, c, h * scale, w * scale)


class CARAFEDown(nn.Module):
    """Content-aware 2x downsampling in the manner of CARAFE++ (Wang et al., TPAMI 2021):
    output pixel l' is a weighted sum of the ``down_kernel`` x ``down_kernel`` neighbourhood
    of input pixel 2 l', with weights predicted from the content by a 1x1 compressor and a
    ``encoder_kernel`` x ``encoder_kernel`` stride-2 encoder, normalised by a softmax.
    Output channels = input channels; (N, C, H, W) -> (N, C, ceil(H / 2), ceil(W / 2)).

    Args:
        channels: C.
        compressed_channels: C_m of the channel compressor.
        encoder_kernel: k_enc of the content encoder (odd).
        down_kernel: k_down, the reassembled neighbourhood (odd).
    """

    def __init__(
        self,
        channels: int,
        compressed_channels: int = 64,
        encoder_kernel: int = 3,
        down_kernel: int = 3,
    ):
        super().__init__()
        if down_kernel % 2 == 0 or encoder_kernel % 2 == 0:
            raise ValueError(f"CARAFEDown kernels must be odd, got down {down_kernel}, "
                             f"encoder {encoder_kernel}")  # fmt: skip
        self.down_kernel = int(down_kernel)
        self.compressor = nn.Conv2d(channels, compressed_channels, 1)
        self.encoder = nn.Conv2d(
            compressed_channels,
            self.down_kernel**2,
            encoder_kernel,
            stride=2,
            padding=encoder_kernel // 2,
        )
        nn.init.xavier_uniform_(self.compressor.weight)
        nn.init.zeros_(self.compressor.bias)
        nn.init.normal_(self.encoder.weight, std=1e-3)  # near-uniform kernels at start
        nn.init.zeros_(self.encoder.bias)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, k_down^2, ceil(H / 2), ceil(W / 2)) kernels summing to 1."""
        return self.encoder(self.compressor(x)).softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self.kernels(x)
        n, c = x.shape[:2]
        k2, h, w = kernels.shape[1:]
        k = self.down_kernel
        neighbours = F.unfold(x, k, padding=k // 2, stride=2).view(n, c, k2, h, w)
        return torch.einsum("nckhw,nkhw->nchw", neighbours, kernels)
