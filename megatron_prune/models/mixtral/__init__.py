"""Mixtral (Mixture of Experts): the Mistral attention, and in every layer a softmax top-k router over SwiGLU
experts whose k gate weights are renormalised to sum 1; no shared expert."""

from megatron_prune.models.family import family_from_config
from megatron_prune.models.mixtral import config
from megatron_prune.models.mixtral.params import PARAMS

FAMILY = family_from_config("mixtral", config, PARAMS)
