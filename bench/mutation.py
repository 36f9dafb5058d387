"""Mutation score of the test suite: plant known bugs in the package core, one at a time, and
check that the tests relevant to each one fail.

The mutants are data (:data:`MUTANTS`): an id, a file relative to the repository root, an exact
snippet of that file, its replacement, a description of the bug it plants and the pytest
targets that should catch it. Every snippet must occur exactly once in its file; the script
stops with a clear error otherwise (after a refactoring, update the snippet or the path in the
list; ``--list`` checks the list without running anything).

Each mutant is applied in an isolated copy of the tree, never in the working tree: by default
a fresh ``git worktree add --detach`` of ``--ref`` into a temporary directory, removed at the
end (``--tree PATH`` uses an existing copy instead; its files are restored after each mutant).
The tests run with the venv's python, ``PYTHONPATH`` = the copy and the copy as working
directory, so the mutated package is the one imported; this is checked once at the start, and
the unmutated targets must pass first (a failing baseline invalidates the run). Per mutant:
``python -m pytest -x -q -p no:cacheprovider TARGETS`` with ``OMP_NUM_THREADS=1``, no bytecode
written, and a timeout. A mutant is *killed* when pytest reports failing tests (exit 1), an
error such as an import error (exit 2) or runs past the timeout; *survived* when the targets
pass; anything else (a crash of the interpreter, no tests collected) is recorded as *error*.
The issue's goal is every mutant killed; each survivor gets a test or a written reason. A
test written for a survivor belongs in that mutant's ``tests`` (or, for a one-off run, pass it
with ``--extra TARGET``, which adds it to every mutant).

The first run (``bench/results/mutation_before.md``, commit 9528e50) killed 22 of 37. The
15 survivors, and what kills each now (the ``K_*`` targets, ``tests/test_mutants_killed.py``,
or the exact-selection tests of ``tests/test_selection.py``, ``SEL_*``): M01 and M05-M08
(which channels a criterion keeps: ``SEL_WEIGHT`` / ``SEL_ACT`` / ``SEL_TAYLOR``), M03 (a
group-size division that happened to give the L2 table's widths: ``K_GLOBAL``), M09 (the
taylor scores' unit norm, which a later per-group L2 normalisation made invisible to every
ranking test: ``K_TAYLOR``), M17 (``K_RECAL``: the exact average of the batch statistics),
M19 (``K_SCALE``), M20 (``K_GREEDY``: the step-by-step greedy on correlated columns), M21
(``K_BIAS``), M22 (``K_TARGET``: a consumer with a non-zero bias; the zoo models' classifier
biases start at zero), M23 (``K_LASSO``: the search must end on a penalty with exactly
``keep`` non-zeros; ``_top_support`` hid a failed search), M26 (``K_MRTS``: a limit equal to
a partial sum) and M30 (``K_RATIO``: 0.3 x 12 = 3.6 and 0.3 x 6 = 1.8, where ``round`` and
``int`` differ). No mutant of the list is equivalent.

Mutants must change behaviour. Two candidates were left out as (nearly) equivalent: dropping
the first-sample slicing of ``prunekit.measure.counting._first_sample`` or of
``engine.budget.count_macs_params`` alone (each path slices twice, and torch-pruning's counter
averages over the batch anyway), and counting MACs outside ``eval_mode`` (the counter works on
a deep copy in eval mode).

Usage::

    python bench/mutation.py --list                    # validate the list against HEAD, print it
    OMP_NUM_THREADS=1 python bench/mutation.py         # all mutants on a worktree of HEAD
    python bench/mutation.py --ref 9528e50 --name mutation_before
    python bench/mutation.py --only M01,M07 --name mutation_try --tree /tmp/copy
    python bench/mutation.py --extra tests/test_new.py     # a new test file for every mutant

Unless ``--before ''`` (or the run is itself the before run), the table also compares with
``bench/results/<--before>.json`` (default ``mutation_before``): a summary line and a
``before`` column.

Writes ``bench/results/<name>.json`` and ``bench/results/<name>.md`` (default name
``mutation``); the files are rewritten after every mutant, so an interrupted run leaves its
partial table (``complete: false``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Mutant:
    """One planted bug: replace ``original`` (exactly one occurrence in ``path``) by
    ``replacement`` and run ``tests`` (pytest targets, relative to the repository root)."""

    id: str
    path: str
    original: str
    replacement: str
    description: str
    tests: tuple[str, ...]


# Test targets, named once so that moving a test means one edit here. Chosen per mutant among
# the tests that exercise the mutated code, leaving out the slow ones (the full zoo in
# test_every_model_every_criterion, real-data training, DDP, ONNX export).
def _nodes(file: str, *names: str) -> tuple[str, ...]:
    return tuple(f"tests/{file}::{n}" for n in names)


E_PLAN = _nodes("test_engine.py", "test_plan_json_roundtrip_and_reproducible")
E_CRIT = _nodes("test_engine.py", "test_every_model_every_criterion[resnet20]",
                "test_every_model_every_criterion[simplecnn]")
E_GLOBAL = _nodes("test_engine.py", "test_global_ranking_keeps_one_channel_everywhere")
E_MERGE = _nodes("test_engine.py", "test_merge_is_exact")
E_TARGET = _nodes("test_engine.py", "test_target_macs_is_met_within_two_points",
                  "test_bad_budgets_raise_config_error")
E_ROUND = _nodes("test_engine.py", "test_round_width_rules",
                 "test_round_to_gives_multiples_within_the_budget")
E_MACS = _nodes("test_engine.py", "test_macs_match_an_independent_count")
FUZZ = _nodes("test_fuzz.py", *(f"test_random_architecture[{s}]" for s in range(6)))
S_GLOBAL = _nodes("test_sparsity.py", "test_global_threshold_is_on_raw_factors_and_keeps_one_per_group")
S_MRTS = _nodes("test_sparsity.py", "test_mrts_cuts_polarised_layers_at_the_gap_and_falls_back_when_needed")
S_THRESH = _nodes("test_sparsity.py",
                  "test_layer_thresholds_cut_bimodal_layer_at_the_gap_and_spare_a_large_one",
                  "test_layer_thresholds_never_empty_a_layer") + S_MRTS
S_REG = _nodes("test_sparsity.py", "test_regulariser_subgradients_and_clamp",
               "test_polarisation_splits_factors_into_two_groups_unlike_l1")
S_TARGET = _nodes("test_sparsity.py", "test_target_macs_is_met_and_reported")
S_TAYLOR = _nodes("test_sparsity.py", "test_taylor_plan_chains_to_the_same_model",
                  "test_target_macs_is_met_and_reported[taylor]")
C_S3 = _nodes("test_csgd.py", "test_centripetal_gradient_is_the_update_equation",
              "test_transform_rewrites_every_per_channel_parameter", "test_transform_sum_gradient_ablation",
              "test_centripetal_training_shrinks_intra_cluster_distance",
              "test_centripetal_step_collapses_clusters_in_one_plain_step")
C_MERGE = _nodes("test_csgd.py", "test_merge_of_identical_members_is_exact",
                 "test_merge_validates_its_clusters")
C_RECAL = _nodes("test_csgd.py", "test_trained_then_recalibrated_clusters_merge_exactly",
                 "test_end_to_end_merge_keeps_accuracy")
R_CORE = _nodes("test_reconstruction.py", "test_selectors_reach_the_brute_force_optimum",
                "test_thinet_greedy_is_the_seed_formula_when_y_is_the_sum",
                "test_thinet_scale_recovers_least_squares", "test_lasso_returns_exactly_keep",
                "test_contributions_sum_to_the_output_on_an_unpruned_model",
                "test_whole_network_reconstructs_better_than_l1", "test_prune_trunk_and_target_macs")
IO_CORE = _nodes("test_io.py", "test_round_trip_identical_outputs",
                 "test_pruned_model_rebuilt_from_unpruned_instance", "test_pruned_depthwise_and_linear",
                 "test_zoo_model_rebuilds_without_instance", "test_zoo_model_pruned_by_hand_rebuilds",
                 "test_engine_pruned_zoo_model_round_trip",
                 "test_a_bias_added_by_reconstruction_survives_save_and_load")
IO_FUZZ = _nodes("test_fuzz.py", "test_fuzz_net_checkpoint_needs_the_instance", "test_pruned_prelu_reloads")
T_RESUME = _nodes("test_train.py", "test_resume_after_interruption_is_identical",
                  "test_resume_missing_or_corrupt_state")
T_RESUME2 = _nodes("test_resume.py", "test_resume_follows_the_stored_epoch_counter",
                   "test_resume_after_epoch_k_trains_exactly_the_remaining_epochs")
# tests/test_selection.py: the exact channels each criterion / method keeps
SEL_WEIGHT = _nodes("test_selection.py", "test_weight_criterion_keeps_its_top_channels")
SEL_ACT = _nodes("test_selection.py", "test_activation_criterion_keeps_its_top_channels")
SEL_TAYLOR = _nodes("test_selection.py",
                    "test_taylor_criterion_keeps_the_channels_with_the_largest_gradient_share",
                    "test_iterative_taylor_removes_the_lowest_channels_step_by_step",
                    "test_iterative_taylor_ranks_l2_normalised_scores_across_layers")
SEL_GLOBAL = _nodes("test_selection.py", "test_global_widths_of_each_normalisation",
                    "test_global_ranking_option_uses_l2_normalised_scores",
                    "test_slimming_ranks_the_raw_bn_scales_across_layers")
SEL_MRTS = _nodes("test_selection.py", "test_mrts_thresholds_cut_exactly_the_near_zero_factors")
SEL_CSGD = _nodes("test_selection.py", "test_csgd_merges_each_planted_cluster_into_its_lowest_member")
SEL_RECON = _nodes("test_selection.py", "test_thinet_greedy_finds_the_cancelling_pair",
                   "test_lasso_keeps_the_largest_true_coefficients",
                   "test_reconstruction_methods_drop_channels_the_next_layer_ignores")


def _killed(*names: str) -> tuple[str, ...]:
    """Tests of tests/test_mutants_killed.py, written for the survivors of the first run."""
    return _nodes("test_mutants_killed.py", *names)


K_GLOBAL = _killed("test_global_ranking_divides_each_group_by_its_l2_norm")
K_TAYLOR = _killed("test_taylor_scores_have_unit_l2_norm_per_layer")
K_RECAL = _killed("test_recalibrate_bn_stores_the_exact_average_of_the_batch_statistics")
K_SCALE = _killed("test_thinet_scales_multiply_the_kept_columns")
K_GREEDY = _killed("test_thinet_greedy_equals_the_step_by_step_greedy_on_correlated_columns")
K_BIAS = _killed("test_auto_fit_bias_leaves_bias_free_consumers_bias_free",
                 "test_lasso_pruning_adds_no_bias_to_a_bias_free_consumer")
K_TARGET = _killed("test_thinet_target_removes_the_consumer_bias")
K_LASSO = _killed("test_lasso_search_finds_a_penalty_with_exactly_keep_nonzeros")
K_MRTS = _killed("test_mrts_threshold_at_an_exact_tie_keeps_gamma_t")
K_RATIO = _killed("test_ratio_budget_rounds_the_removed_count")

MUTANTS: tuple[Mutant, ...] = (
    # ---------------------------------------------------------------- ranking (oneshot)
    Mutant("M01", "prunekit/engine/ranking.py",
           "order = torch.argsort(-scores[g.name], stable=True)",
           "order = torch.argsort(scores[g.name], stable=True)",
           "local ranking keeps the lowest-scoring channels instead of the highest",
           (*SEL_WEIGHT, *E_PLAN, *E_CRIT, *E_GLOBAL, *S_MRTS, *S_TAYLOR)),
    Mutant("M02", "prunekit/engine/ranking.py",
           "    entries.sort()\n",
           "    entries.sort(reverse=True)\n",
           "global ranking removes the most important channels first",
           (*SEL_GLOBAL, *E_GLOBAL, *S_GLOBAL, *S_MRTS)),
    Mutant("M03", "prunekit/engine/ranking.py",
           "s = s / s.norm().clamp_min(1e-30)",
           "s = s / s.numel()",
           "global ranking's per-group L2 normalisation replaced by a division by the group size",
           (*K_GLOBAL, *SEL_GLOBAL, *E_GLOBAL, *S_TAYLOR)),
    Mutant("M04", "prunekit/methods/sparsity.py",
           'ratio, normalize="none")',
           'ratio, normalize="l2")',
           "slimming's global threshold normalises the BN factors per layer (should be raw)",
           (*SEL_GLOBAL, *S_GLOBAL, *S_MRTS)),
    # ---------------------------------------------------------------- criteria
    Mutant("M05", "prunekit/criteria/__init__.py",
           'p = 1 if criterion in ("l1", "bn-scale") else 2',
           'p = 2 if criterion in ("l1", "bn-scale") else 1',
           "l1 and l2 criteria swapped (l1 computes the L2 norm and vice versa)",
           (*SEL_WEIGHT, *E_PLAN, *E_CRIT)),
    Mutant("M06", "prunekit/criteria/__init__.py",
           "lambda s: s.module.weight.detach().abs().cpu())",
           "lambda s: s.module.weight.detach().cpu())",
           "bn-scale uses the signed gamma instead of |gamma|",
           (*SEL_WEIGHT, *E_CRIT)),
    Mutant("M07", "prunekit/criteria/__init__.py",
           'return 1.0 - self.sums["s"] / n',
           'return self.sums["s"] / n',
           "apoz scores the fraction of zeros (mostly-dead channels rank highest)",
           (*SEL_ACT, *E_CRIT)),
    Mutant("M08", "prunekit/criteria/__init__.py",
           "v = (out.detach() * grad).mean(dim=dims).abs().double().cpu()",
           "v = (out.detach() * grad).mean(dim=dims).double().cpu()",
           "taylor drops the absolute value of the first-order term",
           (*SEL_TAYLOR, *E_CRIT, *S_TAYLOR)),
    Mutant("M09", "prunekit/criteria/__init__.py",
           "return v / v.norm().clamp_min(1e-12)  # Molchanov et al. (2017): per-layer L2 normalisation",
           "return v",
           "taylor's per-layer L2 normalisation dropped",
           (*K_TAYLOR, *SEL_TAYLOR, *E_CRIT, *S_TAYLOR)),
    # ---------------------------------------------------------------- surgery
    Mutant("M10", "prunekit/engine/surgery.py",
           "info.pruning_group(group.root, info.out_handler(group.root), remove).prune()",
           "info.pruning_group(group.root, info.out_handler(group.root), gp.keep).prune()",
           "surgery deletes the kept channels instead of the removed ones",
           (*E_PLAN, *E_CRIT, *FUZZ)),
    Mutant("M11", "prunekit/engine/surgery.py",
           'w.index_add_(1, pk_t, w.index_select(1, torch.tensor(pm, device=w.device)))',
           'w.index_copy_(1, pk_t, w.index_select(1, torch.tensor(pm, device=w.device)))',
           "merge overwrites the kept channel's consumer slice instead of summing the members",
           (*E_MERGE, *C_MERGE)),
    Mutant("M12", "prunekit/engine/surgery.py",
           '_PER_CHANNEL_TENSORS = ("weight", "bias", "running_mean", "running_var")',
           '_PER_CHANNEL_TENSORS = ("weight", "bias", "running_mean")',
           "make_identical leaves the BN running variance of cluster members unequal",
           (*E_MERGE, *C_MERGE)),
    # ---------------------------------------------------------------- C-SGD
    Mutant("M13", "prunekit/methods/csgd/centripetal.py",
           "new_rows = mean_g + wd * w_rows + eps * (w_rows - mean_w)",
           "new_rows = mean_g + wd * w_rows - eps * (w_rows - mean_w)",
           "centripetal term's sign flipped: members pushed away from the cluster centre",
           C_S3),
    Mutant("M14", "prunekit/methods/csgd/centripetal.py",
           "mean_w = _label_mean(w_rows, e).index_select(0, e.labels)",
           "mean_w = _label_mean(w_rows, e, True).index_select(0, e.labels)",
           "cluster centre is the members' sum instead of their mean",
           C_S3),
    Mutant("M15", "prunekit/methods/csgd/centripetal.py",
           'mean_g = _label_mean(g_rows, e, self.gradient == "sum").index_select(0, e.labels)',
           "mean_g = g_rows",
           "members keep their own gradient instead of the cluster's shared gradient",
           C_S3),
    Mutant("M16", "prunekit/methods/csgd/merge.py",
           "{c[0]: c[1:] for c in cl if len(c) > 1}",
           "{c[0]: c[1:] for c in cl if len(c) > 2}",
           "merge plan forgets to fold the second member of two-member clusters",
           (*C_MERGE, *SEL_CSGD, *C_RECAL)),
    Mutant("M17", "prunekit/train/bn.py",
           "        m.momentum = None  # cumulative average\n",
           "",
           "BN recalibration keeps momentum 0.1 (exponential, not the exact average)",
           (*K_RECAL, *C_RECAL)),
    Mutant("M18", "prunekit/train/bn.py",
           "        m.reset_running_stats()\n",
           "",
           "BN recalibration does not reset the running statistics first",
           (*K_RECAL, *C_RECAL)),
    # ---------------------------------------------------------------- reconstruction
    Mutant("M19", "prunekit/methods/reconstruct.py",
           "W = cs.weight[:, cs.cols[idx]].double() * factors.to(cs.weight.device)",
           "W = cs.weight[:, cs.cols[idx]].double() / factors.to(cs.weight.device)",
           "ThiNet folds its least-squares scales by division instead of multiplication",
           (*K_SCALE, *R_CORE)),
    Mutant("M20", "prunekit/methods/thinet.py",
           "cost = torch.where(removed, inf, 2.0 * h + diag)",
           "cost = torch.where(removed, inf, h + diag)",
           "ThiNet greedy removal cost loses the factor 2 of the cross term",
           (*K_GREEDY, *SEL_RECON, *R_CORE)),
    Mutant("M21", "prunekit/methods/reconstruct.py",
           'with_bias = (cs.bias is not None) if fit_bias == "auto" else bool(fit_bias)',
           "with_bias = bool(fit_bias)",
           'least-squares refit treats fit_bias="auto" as True (adds a bias to every consumer)',
           (*K_BIAS, *R_CORE,
            *_nodes("test_io.py", "test_a_bias_added_by_reconstruction_survives_save_and_load"))),
    Mutant("M22", "prunekit/methods/sampling.py",
           "                y = y - self.bias[self.rows_o]\n",
           "                y = y + self.bias[self.rows_o]\n",
           "ThiNet's target y - b adds the consumer bias instead of removing it",
           (*K_TARGET, *R_CORE)),
    Mutant("M23", "prunekit/methods/lasso.py",
           "            if nz > keep:\n                lo = alpha\n",
           "            if nz < keep:\n                lo = alpha\n",
           "LASSO penalty bisection moves the wrong bound",
           (*K_LASSO, *SEL_RECON, *R_CORE)),
    # ---------------------------------------------------------------- thresholds (slimming / MRTS)
    Mutant("M24", "prunekit/methods/slimming.py",
           "{n: max(1, int((scores[n].abs() >= t).sum()))",
           "{n: max(1, int((scores[n].abs() > t).sum()))",
           "MRTS threshold prunes the threshold factor itself (> instead of >=)",
           (*K_MRTS, *SEL_MRTS, *S_THRESH)),
    Mutant("M25", "prunekit/methods/slimming.py",
           "limit = float(delta) * float(cum[-1])",
           "limit = float(delta)",
           "eq. 11: delta taken as an absolute mass instead of a share of the layer's total",
           (*K_MRTS, *SEL_MRTS, *S_THRESH)),
    Mutant("M26", "prunekit/methods/slimming.py",
           "torch.tensor([limit], dtype=torch.float64))[0])",
           "torch.tensor([limit], dtype=torch.float64), right=True)[0])",
           "eq. 11 comparison < / <= swapped at the threshold (searchsorted right)",
           (*K_MRTS, *SEL_MRTS, *S_THRESH)),
    Mutant("M27", "prunekit/methods/sparsity.py",
           "g = g * (self.tau - torch.sign(w.abs().double() - means[gd]) + mean_sign[gd])",
           "g = g * (self.tau + torch.sign(w.abs().double() - means[gd]) + mean_sign[gd])",
           "polarisation subgradient's sign term flipped",
           S_REG),
    # ---------------------------------------------------------------- budgets
    Mutant("M28", "prunekit/engine/budget.py",
           "        if frac <= target:\n            hi = mid\n",
           "        if frac >= target:\n            hi = mid\n",
           "target-MACs bisection moves towards more MACs than allowed",
           E_TARGET),
    Mutant("M29", "prunekit/engine/budget.py",
           "return max(round_to, width - width % round_to)",
           "return min(size, width + (-width) % round_to)",
           "round_to rounds widths up instead of down",
           E_ROUND),
    Mutant("M30", "prunekit/engine/budget.py",
           "max(1, g.size - int(round(ratio * g.size)))",
           "max(1, g.size - int(ratio * g.size))",
           "ratio budget truncates the number of removed channels instead of rounding it",
           (*K_RATIO, *E_PLAN, *E_ROUND, *E_CRIT)),
    # ---------------------------------------------------------------- MACs counting
    Mutant("M31", "prunekit/engine/budget.py",
           "return count_macs_params(pruned, info.example_inputs)[0]",
           "return count_macs_params(pruned, info.example_inputs)[1]",
           "target-MACs search counts the candidates' parameters instead of their MACs",
           (*E_TARGET, *E_ROUND)),
    Mutant("M32", "prunekit/api.py",
           '"macs_fraction": macs1 / macs0',
           '"macs_fraction": params1 / params0',
           "the report's macs_fraction is the parameter fraction",
           (*S_TARGET, *E_CRIT)),
    # ---------------------------------------------------------------- checkpoint geometry
    Mutant("M33", "prunekit/io/checkpoint.py",
           "(cout, cin // groups, *module.kernel_size)",
           "(cout, cin, *module.kernel_size)",
           "rebuilt conv weights ignore groups (depthwise layers get full-width kernels)",
           (*IO_CORE, *IO_FUZZ)),
    Mutant("M34", "prunekit/io/checkpoint.py",
           'has_bias = geom.get("bias", module.bias is not None)',
           "has_bias = module.bias is not None",
           "rebuilt layers ignore the recorded bias flag (a reconstructed bias is lost)",
           IO_CORE),
    Mutant("M35", "prunekit/io/checkpoint.py",
           "        module.num_features = n\n",
           "",
           "rebuilt BatchNorm keeps its old num_features attribute",
           IO_CORE),
    # ---------------------------------------------------------------- training resume
    Mutant("M36", "prunekit/train/loop.py",
           'return int(state["epoch"]), bool(state.get("stopped_early", False))',
           'return int(state["epoch"]) + 1, bool(state.get("stopped_early", False))',
           "resume starts one epoch late (the state's epoch count read as the last index)",
           (*T_RESUME2, *T_RESUME)),
    Mutant("M37", "prunekit/train/state.py",
           '        scheduler.load_state_dict(state["scheduler"])\n',
           "",
           "resume does not restore the learning-rate schedule",
           (*T_RESUME2, *T_RESUME)),
)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

class ListError(Exception):
    """The mutant list does not fit the tree (a snippet is missing or ambiguous)."""


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def read_source(path: str, tree: Path | None, ref: str) -> str:
    """``path`` from ``tree`` when given, else from the commit ``ref`` (``git show``)."""
    if tree is not None:
        return (tree / path).read_text()
    try:
        return git("show", f"{ref}:{path}")
    except subprocess.CalledProcessError as exc:
        raise ListError(f"{path}: not in {ref} ({exc.stderr.strip()})") from None


def validate(mutants: Sequence[Mutant], tree: Path | None, ref: str) -> None:
    """Every id unique, every snippet present exactly once, every replacement a change, every
    test file present; raises :class:`ListError` naming all problems."""
    problems = []
    ids = [m.id for m in mutants]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{dup}: duplicate id")
    cache: dict[str, str | None] = {}
    for m in mutants:
        if m.path not in cache:
            try:
                cache[m.path] = read_source(m.path, tree, ref)
            except (ListError, OSError) as exc:
                cache[m.path] = None
                problems.append(f"{m.id}: cannot read {m.path}: {exc}")
        text = cache[m.path]
        if text is None:
            if not any(q.startswith(f"{m.id}:") for q in problems):
                problems.append(f"{m.id}: cannot read {m.path} (see above)")
            continue
        n = text.count(m.original)
        if n != 1:
            problems.append(f"{m.id}: snippet {m.original!r} occurs {n} times in {m.path} "
                            "(must be exactly once: update the snippet or the path in MUTANTS)")
        if m.original == m.replacement:
            problems.append(f"{m.id}: replacement equals the original")
        if not m.tests:
            problems.append(f"{m.id}: no test targets")
        for t in m.tests:
            test_file = t.split("::")[0]
            exists = (tree / test_file).is_file() if tree is not None else \
                bool(git("ls-tree", "--name-only", ref, "--", test_file))
            if not exists:
                problems.append(f"{m.id}: test file of {t!r} not found")
            elif "::" in t:
                func = t.split("::")[-1].split("[")[0]
                body = read_source(test_file, tree, ref)
                if not re.search(rf"^def {re.escape(func)}\(", body, re.M):
                    problems.append(f"{m.id}: no test function {func!r} in {test_file}")
    if problems:
        raise ListError("the mutant list does not fit the tree:\n  " + "\n  ".join(problems))


def change_text(m: Mutant) -> str:
    """A one-line ``original -> replacement`` for tables and progress lines."""
    def one(s: str) -> str:
        s = " ".join(s.split())
        return s if s else "(deleted)"
    return f"{one(m.original)} → {one(m.replacement)}"


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A detached ``git worktree`` of ``ref`` in a temporary directory, removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="prunekit-mutation-"))
    path = parent / "tree"
    git("worktree", "add", "--detach", str(path), ref)
    try:
        yield path
    finally:
        try:
            git("worktree", "remove", "--force", str(path))
        except subprocess.CalledProcessError as exc:
            log(f"warning: git worktree remove failed ({exc.stderr.strip()}); pruning")
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=False)
        shutil.rmtree(parent, ignore_errors=True)


def test_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(tree),
               PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0")
    return env


def pytest_cmd(python: str, targets: Sequence[str]) -> list[str]:
    return [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *targets]


def _junit_counts(path: Path) -> dict[str, int] | None:
    """Test counts from a pytest JUnit XML report (None when it was not written)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _summary(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "no report"
    parts = [f"{counts[k]} {w}" for k, w in (("passed", "passed"), ("failures", "failed"),
                                              ("errors", "errors"), ("skipped", "skipped")) if counts[k]]
    return ", ".join(parts) or "no tests ran"


def run_pytest(python: str, tree: Path, targets: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run the targets in ``tree``; returns rc (None on timeout), seconds, the test counts, the
    first failing test and the output's tail."""
    with tempfile.TemporaryDirectory(prefix="prunekit-mutation-junit-") as tmp:
        junit = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([*pytest_cmd(python, targets), f"--junit-xml={junit}"], cwd=tree,
                                  env=test_env(tree), capture_output=True, text=True, timeout=timeout)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = None
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        seconds = time.perf_counter() - t0
        counts = _junit_counts(junit)
    first = next((ln.strip() for ln in out.splitlines() if re.match(r"^(FAILED|ERROR) ", ln.strip())), None)
    return {"rc": rc, "seconds": seconds, "counts": counts, "summary": _summary(counts),
            "first_failure": first[:300] if first else None,
            "tail": "\n".join(out.splitlines()[-25:])}


def verdict(rc: int | None) -> tuple[str, str]:
    """(status, how) for a pytest exit status (None: timed out)."""
    if rc is None:
        return "killed", "timeout"
    if rc == 0:
        return "survived", "tests passed"
    if rc == 1:
        return "killed", "tests failed"
    if rc == 2:
        return "killed", "error (interrupted: import or collection error)"
    if rc == 5:
        return "error", "no tests collected"
    return "error", f"pytest exit status {rc}"


def check_import(python: str, tree: Path) -> str:
    """The file ``prunekit`` is imported from when pytest runs in ``tree``; must lie inside it."""
    probe_dir = Path(tempfile.mkdtemp(prefix="prunekit-mutation-probe-"))
    try:
        out_file = probe_dir / "where.txt"
        (probe_dir / "test_where.py").write_text(
            "import prunekit\n\n\ndef test_where():\n"
            f"    open({str(out_file)!r}, 'w').write(prunekit.__file__)\n")
        proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(probe_dir / "test_where.py")], cwd=tree, env=test_env(tree),
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not out_file.exists():
            raise SystemExit(f"cannot import prunekit under pytest in {tree}:\n{proc.stdout[-2000:]}"
                             f"{proc.stderr[-2000:]}")
        where = out_file.read_text()
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"pytest in {tree} imports prunekit from {where}, not from the copy: "
                         "mutants would not be tested")
    return where


def apply_mutant(tree: Path, m: Mutant) -> str:
    """Write the mutant into ``tree``; returns the original text (for restoring)."""
    f = tree / m.path
    text = f.read_text()
    if text.count(m.original) != 1:
        raise ListError(f"{m.id}: snippet no longer occurs exactly once in {f}")
    f.write_text(text.replace(m.original, m.replacement))
    return text


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """bench/common.py's machine description (torch imported from the working tree's venv)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from common import machine
        return machine()
    except Exception as exc:  # the description is informative only
        return {"error": f"{type(exc).__name__}: {exc}"}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}"
    return ("" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")


def write_results(name: str, out_dir: Path, payload: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(js)
    rows = payload["rows"]
    killed = sum(r["status"] == "killed" for r in rows)
    survived = [r["id"] for r in rows if r["status"] == "survived"]
    errors = [r["id"] for r in rows if r["status"] == "error"]
    s = payload["settings"]
    before = payload.get("before")
    before_line = []
    if before:
        before_line = [f"Before / after: {before['killed']}/{before['total']} killed at "
                       f"`{before['commit'][:7]}` ({before['name']}.md; survived: "
                       f"{', '.join(before['survived']) or 'none'}) → {killed}/{len(rows)} killed "
                       f"at `{payload['commit'][:7]}`"
                       + ("" if payload["complete"] else " (incomplete run)") + ".", ""]
    lines = [
        "# Mutation score of the test suite",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Commit: `{payload['commit']}` (ref `{s['ref']}`); tree: {s['tree']}",
        "",
        "Machine: `" + json.dumps(payload["machine"]) + "`",
        "",
        "Settings: `" + json.dumps(s) + "`",
        "",
        f"Baseline (unmutated targets): {payload['baseline']['status']}, "
        f"{payload['baseline']['summary']} in {payload['baseline']['seconds']:.0f} s.",
        "",
        f"**Score: {killed} of {len(rows)} mutants killed"
        + (f"; survived: {', '.join(survived)}" if survived else "")
        + (f"; errors: {', '.join(errors)}" if errors else "")
        + f".** Total {payload['seconds'] / 60:.1f} min"
        + ("" if payload["complete"] else f" (incomplete: {len(rows)} of {s['mutants']} run)") + ".",
        "",
        *before_line,
        "A mutant is killed when a target fails (exit 1), errors (exit 2) or times out. "
        "`killed by`: the first failing test. Mutants are listed in `bench/mutation.py` (MUTANTS).",
        "",
        "| id | file | what it changes | change | tests run | result | killed by (or tests passed) "
        "| seconds |" + (" before |" if before else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if before else ""),
    ]
    for r in rows:
        result = r["status"] if r["status"] != "killed" or r["how"] == "tests failed" else \
            f"killed ({r['how'].split(' (')[0]})"
        lines.append("| " + " | ".join(_cell(v) for v in (
            r["id"], r["path"], r["description"], f"`{r['change']}`".replace("|", "\\|"),
            "<br>".join(t.removeprefix("tests/") for t in r["tests"]), result,
            r.get("first_failure") or r.get("summary") or "", r["seconds"],
            *([before["status"].get(r["id"], "")] if before else []))) + " |")
    lines.append("")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(md)
    return js, md


def read_before(path: Path) -> dict[str, Any] | None:
    """Summary of an earlier run's JSON (None when absent or unreadable)."""
    try:
        old = json.loads(path.read_text())
        rows = old["rows"]
    except (OSError, ValueError, KeyError):
        return None
    return {"name": path.stem, "commit": old.get("commit", "?"),
            "killed": sum(r["status"] == "killed" for r in rows), "total": len(rows),
            "survived": [r["id"] for r in rows if r["status"] == "survived"],
            "status": {r["id"]: r["status"] for r in rows}}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def select(only: str | None) -> list[Mutant]:
    if not only:
        return list(MUTANTS)
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    known = {m.id: m for m in MUTANTS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"unknown mutant id(s): {', '.join(unknown)}")
    return [known[w] for w in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="HEAD", help="commit to test (default HEAD)")
    p.add_argument("--tree", type=Path, default=None,
                   help="an existing copy of the tree to mutate (default: a temporary worktree of --ref)")
    p.add_argument("--name", default="mutation", help="output stem under bench/results (default mutation)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--only", default=None, help="comma-separated mutant ids (default: all)")
    p.add_argument("--extra", action="append", default=[], metavar="TARGET",
                   help="a pytest target added to every mutant's targets (repeatable), e.g. a new "
                        "test file not yet named in MUTANTS")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run (default 300)")
    p.add_argument("--python", default=default_python(), help="interpreter that runs pytest (default: .venv)")
    p.add_argument("--before", default="mutation_before",
                   help="stem of an earlier run under --out-dir to compare with ('' for none)")
    p.add_argument("--list", action="store_true", help="validate the mutant list and print it; run nothing")
    args = p.parse_args(argv)
    mutants = select(args.only)
    if args.extra:
        mutants = [replace(m, tests=(*m.tests, *args.extra)) for m in mutants]
    tree_arg = args.tree.resolve() if args.tree is not None else None

    if args.list:
        try:
            validate(mutants, tree_arg, args.ref)
        except ListError as exc:
            print(exc, file=sys.stderr)
            return 1
        where = tree_arg or f"{args.ref} ({git('rev-parse', args.ref)[:12]})"
        print(f"{len(mutants)} mutants, every snippet found exactly once in {where}:")
        for m in mutants:
            print(f"{m.id}  {m.path}\n      {m.description}\n      {change_text(m)}\n"
                  f"      tests: {' '.join(m.tests)}")
        return 0

    command = "OMP_NUM_THREADS=1 " + " ".join(shlex.quote(a) for a in [
        ".venv/bin/python", "bench/mutation.py", *(argv if argv is not None else sys.argv[1:])])
    commit = git("rev-parse", args.ref) if tree_arg is None else git("rev-parse", "HEAD", cwd=tree_arg)
    t_start = time.perf_counter()
    with (worktree(commit) if tree_arg is None else _existing(tree_arg)) as tree:
        validate(mutants, tree, args.ref)
        log(f"{len(mutants)} mutants on {commit[:12]} in {tree}")
        where = check_import(args.python, tree)
        log(f"pytest in the copy imports {where}")
        targets = list(dict.fromkeys(t for m in mutants for t in m.tests))
        log(f"baseline: {' '.join(targets)}")
        base = run_pytest(args.python, tree, targets, timeout=max(args.timeout, 60.0) * 4)
        base_status = "passed" if base["rc"] == 0 else "FAILED"
        log(f"baseline {base_status}: {base['summary']} ({base['seconds']:.0f} s)")
        payload: dict[str, Any] = {
            "command": command, "commit": commit, "machine": machine_info(),
            "settings": {"ref": args.ref if tree_arg is None else "HEAD of --tree", "extra": args.extra,
                         "tree": "temporary git worktree" if tree_arg is None
                         else str(tree_arg), "timeout_s": args.timeout, "python": args.python,
                         "pytest": " ".join(pytest_cmd("python", ["TARGETS"])[1:]),
                         "env": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1 "
                                "PYTHONHASHSEED=0 PYTHONPATH=<copy>",
                         "mutants": len(mutants)},
            "baseline": {"status": base_status, "targets": targets, "rc": base["rc"],
                         "summary": base["summary"], "seconds": base["seconds"]},
            "complete": False, "seconds": 0.0, "mutants": [asdict(m) for m in mutants], "rows": [],
        }
        if args.before and args.before != args.name:
            payload["before"] = read_before(args.out_dir / f"{args.before}.json")
        if base["rc"] != 0:
            payload["baseline"]["tail"] = base["tail"]
            payload["seconds"] = time.perf_counter() - t_start
            write_results(args.name, args.out_dir, payload)
            log("the unmutated targets fail; the run is invalid:\n" + base["tail"])
            return 2
        for i, m in enumerate(mutants, 1):
            original = apply_mutant(tree, m)
            try:
                res = run_pytest(args.python, tree, m.tests, args.timeout)
            finally:
                (tree / m.path).write_text(original)
            status, how = verdict(res["rc"])
            row = {"id": m.id, "path": m.path, "description": m.description, "change": change_text(m),
                   "tests": list(m.tests), "status": status, "how": how, "rc": res["rc"],
                   "first_failure": res["first_failure"], "summary": res["summary"],
                   "counts": res["counts"], "seconds": round(res["seconds"], 1)}
            if status == "error":
                row["tail"] = res["tail"]
            payload["rows"].append(row)
            payload["seconds"] = time.perf_counter() - t_start
            write_results(args.name, args.out_dir, payload)
            log(f"[{i}/{len(mutants)}] {m.id} {m.path}: {status} ({how}; "
                f"{res['first_failure'] or res['summary']}) {res['seconds']:.0f} s")
        payload["complete"] = True
        payload["seconds"] = time.perf_counter() - t_start
        js, md = write_results(args.name, args.out_dir, payload)
    rows = payload["rows"]
    killed = sum(r["status"] == "killed" for r in rows)
    log(f"score {killed}/{len(rows)} killed in {payload['seconds'] / 60:.1f} min; wrote {js} and {md}")
    return 0


@contextmanager
def _existing(tree: Path) -> Iterator[Path]:
    if not (tree / "prunekit").is_dir():
        raise SystemExit(f"--tree {tree}: no prunekit package there")
    if tree.resolve() == REPO:
        raise SystemExit("--tree must be a copy, not the working tree itself")
    yield tree


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ListError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
