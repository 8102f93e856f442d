"""The architectures the attribution methods support, and how each one's blocks differ from llama's.

One registry for both sides: the torch model `ig` builds (torch_model.py) and the closed form `exact`
and `dla` evaluate from llama.cpp's passes (passes.py) read the same facts from here, per architecture,
as llama.cpp's src/models/<arch>.cpp builds them, instead of inferring them from which metadata a file has.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedArchitecture


@dataclass(frozen=True)
class Family:
    """How one architecture's blocks differ from llama's (llama.cpp's src/models/<arch>.cpp)."""

    act: str = "silu"  # the FFN gate's activation: "silu" or "gelu_tanh"
    embed_scale: bool = False  # token embeddings × sqrt(n_embd) (Gemma)
    swa_pattern: int = 0  # default sliding-window pattern when the file names none: every n-th layer global
    gated: bool = True  # act ⊙ up; False (Phi-2): act = GELU(up), no gate
    parallel: bool = False  # attention and FFN both read attn_norm(x) (Phi-2); else the FFN reads ffn_norm(x + attn)
    layer_norm: bool = False  # LayerNorm (mean removed, with a bias) instead of RMSNorm (Phi-2)
    neox_rope: bool = True  # rope rotates halves (LLAMA_ROPE_TYPE_NEOX); False: adjacent pairs (llama's NORM)
    # llama.cpp's soft-caps when the file does not say (src/models/gemma2.cpp reads them as optional)
    attn_softcap: float = 0.0
    final_softcap: float = 0.0

    @property
    def eps_key(self) -> str:
        """The metadata key (after `<arch>.`) of the norms' epsilon: LLM_NORM models carry a LayerNorm one."""
        return "attention.layer_norm_epsilon" if self.layer_norm else "attention.layer_norm_rms_epsilon"


FAMILIES: dict[str, Family] = {
    "llama": Family(neox_rope=False),
    "qwen2": Family(),
    "qwen3": Family(),
    "gemma": Family("gelu_tanh", embed_scale=True),
    "gemma2": Family("gelu_tanh", embed_scale=True, swa_pattern=2, attn_softcap=50.0, final_softcap=30.0),
    "gemma3": Family("gelu_tanh", embed_scale=True, swa_pattern=6),
    "phi3": Family(),
    "phi2": Family("gelu_tanh", gated=False, parallel=True, layer_norm=True),
}


def family(arch: str, what: str) -> Family:
    """`arch`'s family, or UnsupportedArchitecture naming `what` (the method that needs it) and the ones supported."""
    try:
        return FAMILIES[arch]
    except KeyError:
        raise UnsupportedArchitecture(f"{arch}: {what} supports {', '.join(FAMILIES)}") from None
