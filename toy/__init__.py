"""The synthetic world: generative processes, their exact belief states and entropies, and data.

``toy.processes`` builds validated (generalized) HMMs and names them (``make_process``), ``toy.beliefs``
computes exact beliefs, entropies (nats) and mixed-state presentations, ``toy.factors`` splits factored beliefs
and tokens, ``toy.data`` samples tokens and beliefs, ``toy.datasets`` holds the resumable training stream (the one ``toy.train``
draws from) and exports it as Hugging Face datasets. The model, trainer (``toy.train``, with ``toy.optim`` and
``toy.train_checkpoint``), collection step, GRPO plumbing (``toy.grpo``, ``toy.grpo_trainer``), representation
measures and composition detector are submodules (not imported here); the runnable experiments are
``toy.experiments``. Importing ``toy`` does nothing else.
"""

from toy.beliefs import (
    MixedStatePresentation,
    belief_states,
    entropy_rate,
    enumerate_sequences,
    initial_token_distribution,
    loss_floor,
    mixed_state_presentation,
    myopic_entropy,
    next_token_distributions,
    sequence_log_probabilities,
    sequence_probabilities,
)
from toy.data import Batch, sample
from toy.factors import (
    factor_marginals,
    factor_tokens,
    joint_tokens,
    product_approximation,
    product_belief,
    schmidt_spectrum,
)
from toy.processes import (
    Process,
    capability_tag,
    chained,
    correlated,
    even,
    golden_mean,
    mess3,
    noisy_and,
    noisy_gate,
    noisy_implies,
    noisy_not,
    product,
    rare_factor,
    rrxor,
    zero_one_random,
)

__all__ = [
    "Batch",
    "MixedStatePresentation",
    "Process",
    "belief_states",
    "capability_tag",
    "chained",
    "correlated",
    "entropy_rate",
    "enumerate_sequences",
    "even",
    "factor_marginals",
    "factor_tokens",
    "golden_mean",
    "initial_token_distribution",
    "joint_tokens",
    "loss_floor",
    "mess3",
    "mixed_state_presentation",
    "myopic_entropy",
    "next_token_distributions",
    "noisy_and",
    "noisy_gate",
    "noisy_implies",
    "noisy_not",
    "product",
    "product_approximation",
    "product_belief",
    "rare_factor",
    "rrxor",
    "sample",
    "schmidt_spectrum",
    "sequence_log_probabilities",
    "sequence_probabilities",
    "zero_one_random",
]
