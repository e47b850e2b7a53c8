"""TSHSR: two-stream hierarchical similarity reasoning, OUR DESIGN after the abstract of "Two-stream hierarchical
similarity reasoning for image-text matching" (Ran Chen, Hanli Wang, Lei Wang, Sam Kwong; arXiv 2203.05349, 2022).

Only the paper's abstract is public: no official code, equations, hyper-parameters or numbers exist to compare
with. Results of this model are results of our design and must never be reported as the paper's.

From the abstract: (1) a hierarchical similarity reasoning module that extracts context information at more than
one level and reasons over it together with local interaction information; (2) a two-stream architecture, an
image-to-text and a text-to-image level similarity computation (where earlier work, e.g. SGRAF, has one stream);
(3) end-to-end training, evaluation on MSCOCO and Flickr30K.

Our design (every choice below is ours, not the paper's): the encoders are SGRAF's (SCAN's precomputed-region
encoder, SGRAF's bi-GRU text encoder); nodes are SGRAF-style similarity vectors of dimension ``sim_dim`` computed
by the fused :func:`itm_kernels.local_sim.local_sim` (t2i: words attend over regions; i2t: ``direction="i2t"``,
regions attend over words; lambda 9 in both); three levels per stream: local (words / regions), intermediate
(phrases = learned attention pooling over windows of ``phrase_window`` words; region groups = ``region_groups``
learned attention-pooled groups of regions), global (SGRAF's VisualSA / TextSA vectors); SGRAF's SGR steps over
all nodes of a stream with a learned additive hierarchy bias between each intermediate node and the local nodes
it summarises; one score per stream, fused by sum or learned weights; training: SGRAF's SGR recipe. With
``streams=("t2i",)`` and ``levels=("global", "local")`` the head is exactly SGRAF's SGR head
(:meth:`TSHSRSimilarity.load_sgr_state_dict`).

Modules: :mod:`.config` (:class:`TSHSRConfig`), :mod:`.layers` (phrases, region groups, one stream's parameters),
:mod:`.head` (:class:`TSHSRSimilarity`: forward and the bounded-memory all-pairs ``sims``), :mod:`.model`
(:class:`TSHSR`, :class:`TSHSREnsemble`). The plain per-pair loop is :mod:`itm_models.baselines.tshsr`.
"""
from .config import FUSIONS, LEVELS, STREAMS, TSHSRConfig  # noqa: F401
from .head import DEFAULT_BLOCK_ROWS, TSHSRSimilarity  # noqa: F401
from .layers import PhrasePooling, RegionGroups, StreamReasoning, phrase_count  # noqa: F401
from .model import TSHSR, TSHSREnsemble  # noqa: F401

__all__ = ["TSHSR", "TSHSRConfig", "TSHSREnsemble", "TSHSRSimilarity", "PhrasePooling", "RegionGroups",
           "StreamReasoning", "phrase_count", "STREAMS", "LEVELS", "FUSIONS"]
