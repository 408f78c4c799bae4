"""k-sparse probing: how well k columns of SAE codes (or activations) predict a label.

For each task the ``k`` columns with the largest absolute difference between the class
means (on the training split only) are kept, standardised with training statistics, and an
L2-regularised logistic regression is fitted on them; the figure is its test accuracy. A
multi-class label becomes one binary one-vs-rest task per class, and the accuracies are
averaged. Everything runs in float64 numpy on the host: the fits have ``k + 1`` parameters.

References:
  Gurnee et al. 2023, "Finding Neurons in a Haystack: Case Studies with Sparse Probing",
  arXiv 2305.01610; Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
  arXiv 2406.04093; SAEBench (k-sparse probing, k in {1, 2, 5}).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from jaxtyping import ArrayLike, Bool, Float, Int

NEWTON_STEPS = 100  # Upper bound on damped Newton steps per fit.
_GRAD_TOL = 1e-10  # A fit stops early once the gradient's largest entry is below this.


def _features(features: ArrayLike, name: str = "features") -> np.ndarray:
  x = np.asarray(features)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{name} must be 2-D [n, f] with n, f >= 1; got shape {x.shape}.")
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise ValueError(f"{name} must hold real numbers; got dtype {x.dtype}.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} must be finite; it holds NaN or inf.")
  return x


def _labels(labels: ArrayLike, n: int | None, name: str = "labels") -> np.ndarray:
  y = np.asarray(labels)
  if y.dtype == bool:
    y = y.astype(np.int64)
  if y.ndim != 1 or (n is not None and y.shape[0] != n) or not np.issubdtype(
      y.dtype, np.integer):
    length = "" if n is None else f" of length n={n} (one label per feature row)"
    raise ValueError(f"{name} must be a 1-D integer (or bool) array{length}; got dtype "
                     f"{y.dtype} and shape {y.shape}.")
  return y


def _check_l2(l2) -> float:
  if isinstance(l2, bool) or not isinstance(l2, (int, float, np.number)) or not (
      math.isfinite(l2) and l2 > 0):
    raise ValueError(f"l2 must be a finite number > 0 (it keeps the weights of separable "
                     f"data finite); got {l2!r}.")
  return float(l2)


def stratified_split(labels: Int[ArrayLike, " n"], train_fraction: float = 0.8,
                     seed: int = 0) -> tuple[Int[np.ndarray, " n_train"],
                                             Int[np.ndarray, " n_test"]]:
  """A deterministic stratified train/test split of row indices.

  Each class's rows are shuffled with ``np.random.default_rng(seed)`` and the first
  ``round(train_fraction * n_c)`` of them, clipped to ``[1, n_c - 1]``, go to training,
  so every class appears in both splits.

  Args:
    labels: ``[n]`` integer (or bool) class labels.
    train_fraction: share of each class used for training, in (0, 1).
    seed: seed of the shuffle.

  Returns:
    ``(train_idx, test_idx)``, sorted int64 row indices that partition ``range(n)``.

  Raises:
    ValueError: on a bad argument or a class with fewer than 2 rows.
  """
  y = _labels(labels, None)
  if isinstance(train_fraction, bool) or not isinstance(
      train_fraction, (int, float, np.number)) or not 0 < train_fraction < 1:
    raise ValueError(f"train_fraction must be a number in (0, 1); got {train_fraction!r}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an int >= 0; got {seed!r}.")
  classes, counts = np.unique(y, return_counts=True)
  if np.any(counts < 2):
    raise ValueError(f"every class needs at least 2 rows (one to train, one to test); "
                     f"classes {classes[counts < 2].tolist()} have fewer.")
  rng = np.random.default_rng(seed)
  train = []
  for c, n_c in zip(classes, counts):
    rows = rng.permutation(np.flatnonzero(y == c))
    train.append(rows[:min(max(round(train_fraction * n_c), 1), n_c - 1)])
  is_train = np.zeros(y.shape[0], bool)
  is_train[np.concatenate(train)] = True
  return np.flatnonzero(is_train), np.flatnonzero(~is_train)


def _class_sums(x: np.ndarray, rows: np.ndarray, y: np.ndarray, classes: np.ndarray
                ) -> np.ndarray:
  """``[c, f]`` float64 column sums of the rows ``rows`` (labels ``y``) of each class."""
  return np.stack([np.sum(x[rows[y == c]], axis=0, dtype=np.float64) for c in classes])


def _ranking(scores: np.ndarray) -> np.ndarray:
  # Stable: equal scores keep column order.
  return np.argsort(-scores, kind="stable")


def mean_difference_ranking(features: Float[ArrayLike, "n f"], labels: Int[ArrayLike, " n"]
                            ) -> tuple[Int[np.ndarray, " f"], Float[np.ndarray, " f"]]:
  """Columns ordered by the absolute difference of their two class means.

  Args:
    features: ``[n, f]`` codes or activations.
    labels: ``[n]`` binary labels (exactly two distinct values, e.g. bool or 0/1); for a
      multi-class label pass ``labels == c`` for one-vs-rest.

  Returns:
    ``(order, scores)``: ``[f]`` column indices, largest score first (ties by column
    index), and the ``[f]`` float64 scores ``|mean(x | class a) - mean(x | class b)|``.

  Raises:
    ValueError: on bad shapes, non-finite features, or labels without exactly 2 values.
  """
  x = _features(features)
  y = _labels(labels, x.shape[0])
  classes, counts = np.unique(y, return_counts=True)
  if classes.shape[0] != 2:
    raise ValueError(f"labels must take exactly 2 values; got {classes.shape[0]} "
                     f"({classes[:10].tolist()}). For a multi-class label pass labels == c.")
  means = _class_sums(x, np.arange(x.shape[0]), y, classes) / counts[:, None]
  scores = np.abs(means[1] - means[0])
  return _ranking(scores), scores


def fit_logistic_regression(x: Float[ArrayLike, "n k"], y: Bool[ArrayLike, " n"], *,
                            l2: float = 1e-3, steps: int = NEWTON_STEPS
                            ) -> tuple[Float[np.ndarray, " k"], float]:
  """L2-regularised logistic regression by damped Newton steps, in float64.

  Minimises ``mean(log(1 + exp(z)) - y z) + l2 / 2 |w|^2`` with ``z = x w + b``; the
  intercept ``b`` is not penalised. Each of at most ``steps`` full-batch Newton steps is
  halved until the objective decreases (Armijo); the loop stops once the gradient's
  largest entry is below 1e-10. With ``l2 > 0`` and both classes present the objective
  is strictly convex, so the fit is unique and deterministic.

  Args:
    x: ``[n, k]`` inputs (standardise them first for a scale-free ``l2``).
    y: ``[n]`` binary targets (bool or 0/1), both values present.
    l2: ridge strength, > 0.
    steps: maximum Newton steps, >= 1.

  Returns:
    ``(w [k], b)``.

  Raises:
    ValueError: on bad shapes, non-binary targets, one class only, or bad ``l2``/``steps``.
  """
  x = _features(x, "x").astype(np.float64)
  y = _labels(y, x.shape[0], "y")
  if not np.all((y == 0) | (y == 1)) or np.all(y == y[0]):
    raise ValueError("y must be binary (0/1 or bool) with both values present; got values "
                     f"{np.unique(y)[:10].tolist()}.")
  l2 = _check_l2(l2)
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
  n, k = x.shape
  design = np.concatenate([x, np.ones((n, 1))], axis=1)
  target = y.astype(np.float64)
  ridge = np.full(k + 1, l2)
  ridge[-1] = 0.0

  def objective(theta):
    z = design @ theta
    return float(np.mean(np.logaddexp(0.0, z) - target * z) + 0.5 * np.sum(ridge * theta ** 2))

  theta = np.zeros(k + 1)
  value = objective(theta)
  for _ in range(steps):
    p = 0.5 * (1.0 + np.tanh(0.5 * (design @ theta)))  # A sigmoid that cannot overflow.
    grad = design.T @ (p - target) / n + ridge * theta
    if np.max(np.abs(grad)) < _GRAD_TOL:
      break
    hessian = (design.T * (p * (1.0 - p))) @ design / n + np.diag(ridge)
    hessian[np.diag_indices_from(hessian)] += 1e-12  # Keeps the solve defined.
    direction = np.linalg.solve(hessian, grad)
    step, slope = 1.0, float(grad @ direction)
    for _ in range(50):
      candidate = objective(theta - step * direction)
      if candidate <= value - 1e-4 * step * slope:
        break
      step *= 0.5
    else:
      break  # No decrease left at machine precision: converged.
    theta, value = theta - step * direction, candidate
  return theta[:k], float(theta[k])


class ProbeFit(NamedTuple):
  """A fitted k-sparse binary probe.

  Attributes:
    columns: ``[k]`` selected feature columns, best first.
    mean: ``[k]`` training means of those columns.
    scale: ``[k]`` training standard deviations (1 where a column is constant).
    weights: ``[k]`` logistic-regression weights on the standardised columns.
    bias: intercept.
    train_accuracy: accuracy on the training rows.
    test_accuracy: accuracy on the test rows.
  """

  columns: Int[np.ndarray, " k"]
  mean: Float[np.ndarray, " k"]
  scale: Float[np.ndarray, " k"]
  weights: Float[np.ndarray, " k"]
  bias: float
  train_accuracy: float
  test_accuracy: float


def _fit_columns(x, train_rows, y_train, test_rows, y_test, columns, l2) -> ProbeFit:
  """Standardises ``x[:, columns]`` with training statistics and fits a probe."""
  train = x[np.ix_(train_rows, columns)].astype(np.float64)
  mean, scale = train.mean(0), train.std(0)
  scale = np.where(scale > 0, scale, 1.0)
  w, b = fit_logistic_regression((train - mean) / scale, y_train, l2=l2)

  def accuracy(rows, y):
    z = ((x[np.ix_(rows, columns)].astype(np.float64) - mean) / scale) @ w + b
    return float(np.mean((z > 0) == (y == 1)))

  return ProbeFit(columns, mean, scale, w, b, accuracy(train_rows, y_train),
                  accuracy(test_rows, y_test))


def _check_ks(ks, f: int) -> tuple[int, ...]:
  if isinstance(ks, (int, np.integer)):
    ks = (ks,)
  ks = tuple(ks)
  bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer))
         or not 1 <= k <= f]
  if not ks or bad or len(set(ks)) != len(ks):
    raise ValueError(f"ks must be distinct ints in [1, f={f}] (f = number of feature "
                     f"columns); got {ks!r}. Drop the values above f or the duplicates.")
  return tuple(int(k) for k in ks)


def fit_sparse_probe(train_features: Float[ArrayLike, "n f"], train_labels: Bool[ArrayLike, " n"],
                     test_features: Float[ArrayLike, "m f"], test_labels: Bool[ArrayLike, " m"],
                     k: int, *, l2: float = 1e-3) -> ProbeFit:
  """Fits one binary k-sparse probe on given training rows and scores it on test rows.

  The ``k`` columns come from :func:`mean_difference_ranking` on the training rows only;
  they are standardised with training means and standard deviations.

  Args:
    train_features: ``[n, f]`` training codes or activations.
    train_labels: ``[n]`` binary training labels (0/1 or bool), both present.
    test_features: ``[m, f]`` test codes or activations.
    test_labels: ``[m]`` binary test labels (0/1 or bool).
    k: number of columns, in ``[1, f]``.
    l2: ridge strength of the logistic regression, > 0.

  Returns:
    The :class:`ProbeFit`.

  Raises:
    ValueError: on bad shapes, non-binary labels, a bad ``k`` or ``l2``.
  """
  x_train, x_test = _features(train_features, "train_features"), _features(
      test_features, "test_features")
  if x_test.shape[1] != x_train.shape[1]:
    raise ValueError(f"test_features must have the f={x_train.shape[1]} columns of "
                     f"train_features; got {x_test.shape[1]}.")
  y_train = _labels(train_labels, x_train.shape[0], "train_labels")
  y_test = _labels(test_labels, x_test.shape[0], "test_labels")
  for name, y in (("train_labels", y_train), ("test_labels", y_test)):
    if not np.all((y == 0) | (y == 1)):
      raise ValueError(f"{name} must be binary (0/1 or bool); got values "
                       f"{np.unique(y)[:10].tolist()}.")
  (k,) = _check_ks((k,), x_train.shape[1])
  l2 = _check_l2(l2)
  order, _ = mean_difference_ranking(x_train, y_train)
  x = np.concatenate([x_train, x_test])
  n = x_train.shape[0]
  return _fit_columns(x, np.arange(n), y_train, np.arange(n, x.shape[0]), y_test, order[:k],
                      l2)


def k_sparse_probe(features: Float[ArrayLike, "n f"], labels: Int[ArrayLike, " n"],
                   ks: Sequence[int] = (1, 2, 5, 20), *, train_fraction: float = 0.8,
                   seed: int = 0, l2: float = 1e-3) -> dict[int, float]:
  """Test accuracy of k-sparse logistic-regression probes, for each ``k`` in ``ks``.

  The rows are split by :func:`stratified_split` (``train_fraction``, ``seed``). A binary
  label is one task; a label with ``c > 2`` classes gives ``c`` one-vs-rest tasks
  (``labels == class`` against the rest, on the same split) whose binary test accuracies
  are averaged, so chance is the mean majority share of those tasks, above 1/2. For each
  task the columns are ranked once by :func:`mean_difference_ranking` on the training
  rows, and for each ``k`` the top ``k`` are standardised with training statistics and fed
  to :func:`fit_logistic_regression`.

  Args:
    features: ``[n, f]`` SAE codes or model activations, one row per example.
    labels: ``[n]`` integer (or bool) labels with at least 2 classes, each of 2 or more rows.
    ks: distinct numbers of columns, each in ``[1, f]``.
    train_fraction: share of each class used for training, in (0, 1).
    seed: seed of the split.
    l2: ridge strength of the logistic regression, > 0.

  Returns:
    ``{k: mean test accuracy}`` in the order of ``ks``.

  Raises:
    ValueError: on bad shapes, non-finite features, fewer than 2 classes, a class with
      fewer than 2 rows, or a bad ``ks``, ``train_fraction``, ``seed`` or ``l2``.
  """
  x = _features(features)
  y = _labels(labels, x.shape[0])
  ks = _check_ks(ks, x.shape[1])
  l2 = _check_l2(l2)
  classes = np.unique(y)
  if classes.shape[0] < 2:
    raise ValueError(f"labels must hold at least 2 classes; got only {classes.tolist()}.")
  train_idx, test_idx = stratified_split(y, train_fraction, seed)
  y_train, y_test = y[train_idx], y[test_idx]
  # One task for a binary label, else one-vs-rest per class.
  tasks = classes[1:] if classes.shape[0] == 2 else classes
  n_train = y_train.shape[0]
  sums = _class_sums(x, train_idx, y_train, classes)  # Training rows only.
  total, counts = sums.sum(0), np.array([np.sum(y_train == c) for c in classes])
  accuracy = {k: 0.0 for k in ks}
  for c in tasks:
    i = int(np.searchsorted(classes, c))
    rest = (total - sums[i]) / (n_train - counts[i])
    order = _ranking(np.abs(sums[i] / counts[i] - rest))
    task_train, task_test = (y_train == c).astype(np.int64), (y_test == c).astype(np.int64)
    for k in ks:
      fit = _fit_columns(x, train_idx, task_train, test_idx, task_test, order[:k], l2)
      accuracy[k] += fit.test_accuracy / tasks.shape[0]
  return accuracy
