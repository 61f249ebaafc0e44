"""T5 span corruption in numpy (Raffel et al. 2020, §3.1.4).

Ports of T5's `random_spans_helper`, `random_spans_noise_mask`,
`noise_span_to_unique_sentinel` and `nonnoise_span_to_unique_sentinel`
(t5/data/preprocessors.py), with a numpy Generator in place of TF's stateless
seeds. L is the raw token count of one example.

Example with noise mask [0 1 1 0 0 1 1 0] over tokens [a b c d e f g h]:
inputs  = [a X0 d e X1 h EOS]
targets = [X0 b c X1 f g X2 EOS]
where Xi = sentinel i. Each noise span becomes one sentinel in the inputs; in
the targets each non-noise span becomes one, so the sentinel before a span of
target tokens names the gap in the inputs they fill.
"""
import numpy as np


def _lengths(tokens_length, noise_density, mean_noise_span_length,
             extra_tokens_per_span_inputs, extra_tokens_per_span_targets):
  num_noise_tokens = int(round(tokens_length * noise_density))
  num_nonnoise_tokens = tokens_length - num_noise_tokens
  num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
  # Inputs: non-noise tokens, one sentinel per span, eos; targets likewise.
  return (num_nonnoise_tokens + num_noise_spans * extra_tokens_per_span_inputs + 1,
          num_noise_tokens + num_noise_spans * extra_tokens_per_span_targets + 1)


def random_spans_helper(inputs_length: int, noise_density: float,
                        mean_noise_span_length: float,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
  """(raw tokens_length, targets_length) that give exactly `inputs_length`.

  The longest raw length whose corrupted inputs (with eos) still fit in
  `inputs_length`; T5: 512 inputs at density 0.15, span 3 -> (568, 114).
  """
  if inputs_length < 2:
    raise ValueError(f"inputs_length must be >= 2, got {inputs_length}")
  if not 0.0 < noise_density < 1.0:
    raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
  if mean_noise_span_length < 1.0:
    raise ValueError(
        f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
  args = (noise_density, mean_noise_span_length,
          extra_tokens_per_span_inputs, extra_tokens_per_span_targets)
  tokens_length = inputs_length - 1
  while _lengths(tokens_length + 1, *args)[0] <= inputs_length:
    tokens_length += 1
  inputs_length, targets_length = _lengths(tokens_length, *args)
  # T5's tweak: at density 0.5 make targets no longer than inputs.
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
  """i64[num_segments]: random positive lengths that sum to num_items."""
  first_in_segment = np.zeros(num_items, dtype=np.int64)
  first_in_segment[1:] = rng.permutation(
      np.arange(num_items - 1) < num_segments - 1)
  segment_id = np.cumsum(first_in_segment)
  return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float,
                            mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """bool[length]: T5's noise mask, True on noise tokens.

  round(length * noise_density) noise tokens (at least 1, at most length - 1)
  in round(num_noise / mean_noise_span_length) spans (at least 1). Spans
  alternate non-noise, noise, ..., so the mask starts with non-noise and ends
  with noise; span lengths are uniformly random segmentations.
  """
  if noise_density == 0.0:
    return np.zeros(length, dtype=bool)
  orig_length = length
  length = max(length, 2)  # avoid degeneracy
  num_noise_tokens = int(round(length * noise_density))
  num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
  num_noise_spans = max(int(round(num_noise_tokens / mean_noise_span_length)), 1)
  num_nonnoise_tokens = length - num_noise_tokens
  # T5 draws the noise segmentation first, then the non-noise one.
  noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans, rng)
  nonnoise_span_lengths = _random_segmentation(
      num_nonnoise_tokens, num_noise_spans, rng)
  interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1)
  span_starts = np.cumsum(interleaved.reshape(-1))[:-1]
  span_start_indicator = np.zeros(length, dtype=np.int64)
  span_start_indicator[span_starts] = 1
  is_noise = np.cumsum(span_start_indicator) % 2 == 1
  return is_noise[:orig_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                  first_sentinel_id: int) -> np.ndarray:
  """i32[L'] tokens with each noise span replaced by one sentinel.

  The k-th span (from 0) gets `first_sentinel_id - k` (T5 counts down from
  the highest id).
  """
  tokens = np.asarray(tokens)
  noise_mask = np.asarray(noise_mask, dtype=bool)
  if tokens.shape != noise_mask.shape or tokens.ndim != 1:
    raise ValueError(f"tokens {tokens.shape} and noise_mask {noise_mask.shape} "
                     "must be 1-D of one length")
  prev_is_noise = np.concatenate([[False], noise_mask[:-1]])
  first_noise = noise_mask & ~prev_is_noise
  subsequent_noise = noise_mask & prev_is_noise
  sentinels = first_sentinel_id + 1 - np.cumsum(first_noise)
  out = np.where(first_noise, sentinels, tokens)
  return out[~subsequent_noise].astype(tokens.dtype)


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                     first_sentinel_id: int) -> np.ndarray:
  """i32[L'] tokens with each non-noise span replaced by one sentinel."""
  return noise_span_to_unique_sentinel(
      tokens, ~np.asarray(noise_mask, dtype=bool), first_sentinel_id)


def span_corruption_with_mask(tokens: np.ndarray, noise_mask: np.ndarray, *,
                              first_sentinel_id: int,
                              eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs i32[I], targets i32[T]) for a given mask, both ending in eos."""
  inputs = noise_span_to_unique_sentinel(tokens, noise_mask, first_sentinel_id)
  targets = nonnoise_span_to_unique_sentinel(tokens, noise_mask,
                                             first_sentinel_id)
  eos = np.asarray([eos_id], dtype=np.int32)
  return (np.concatenate([inputs.astype(np.int32), eos]),
          np.concatenate([targets.astype(np.int32), eos]))


def span_corruption(tokens: np.ndarray, rng: np.random.Generator, *,
                    noise_density: float, mean_noise_span_length: float,
                    first_sentinel_id: int,
                    eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """T5's span corruption of one raw segment i32[L] (no eos in it)."""
  mask = random_spans_noise_mask(len(tokens), noise_density,
                                 mean_noise_span_length, rng)
  return span_corruption_with_mask(tokens, mask,
                                   first_sentinel_id=first_sentinel_id,
                                   eos_id=eos_id)
