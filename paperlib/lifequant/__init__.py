"""LifeQuant (Chen, Yang, Chen, ICCV 2023): ProxQ + BaLL for lifelong quantization.

The method, the original code's behaviour and every departure are described in ``docs/lifequant.md``; the shipped
code differs from the paper's figure and abstract (docs/lifequant.md, "Paper mode and code mode"), so each function
names the variant it follows and the original code's file.

- :mod:`.quant` — quantizers (docs/lifequant.md, "Quantizers"): ``quantize_weight``, ``quantize_activation``,
  their modules, ``quantize_lifequant``.
- :mod:`.ball` — BaLL ("BaLL"): ``class_counts``, ``ball_scale``, ``ball_loss``, ``BaLLLoss``.
- :mod:`.prox` — ProxQ's penalty and the baselines' importance ("ProxQ", "Baselines").
- :mod:`.splits` — task / replay generators ("Splits and replay"), in memory and for image folders.
- :mod:`.metrics` — ``A_T``, ``F_T``, ``BWT``, learned tasks ("Metrics").
- :mod:`.pipeline` — the 32 -> 8 -> 4-bit lifelong pipeline ("Training protocol"; ``mode="paper"``/``"code"``,
  baselines), the presets, the notebook's driver ``run_lifequant`` and its tables.
- :mod:`.verdicts` — the notebook's claims and its "What we found" paragraph ("Claims and verdicts").
"""

from .ball import BALL_FORMS, BaLLLoss, ball_loss, ball_scale, class_counts, read_reweight, scale_vector
from .metrics import (
    LEARNED_THRESHOLD,
    accuracy_matrix,
    forgetting_minus_bwt,
    forgetting_on,
    forgetting_per_task,
    learned_tasks,
    lifelong_metrics,
)
from .pipeline import (
    METHOD_LABELS,
    METHOD_PRESETS,
    MODES,
    LifelongCriterion,
    LifelongMethod,
    LifelongResult,
    LifelongSchedule,
    LossMonitor,
    MissingData,
    SeenTaskEval,
    accuracy_matrix_table,
    check_expectations,
    check_experiment,
    class_count_table,
    compute_importance,
    experiment_methods,
    identity_at_32_bits,
    load_domain_data,
    make_method,
    make_schedule,
    mean_accuracy_matrix,
    method_specs,
    pretrain_table,
    run_lifelong,
    run_lifequant,
    state_fingerprint,
    summary_table,
    task0_start,
)
from .prox import (
    DEFAULT_LAMBDA,
    METHODS,
    NOOP_IN_ORIGINAL,
    cdf_prox_penalty,
    ewc_importance,
    importance,
    mas_importance,
    method_importance,
    prox_penalty,
    qnoise_loss,
    scp_importance,
    snapshot,
    zero_importance,
)
from .quant import (
    ACT_QUANTIZERS,
    MOBILENET_CIFAR_WEIGHT_STD,
    PAIRED_ACTIVATION,
    WEIGHT_QUANTIZERS,
    LifeQuantActivation,
    LifeQuantConfig,
    LifeQuantWeight,
    cdf_space,
    cdf_space_error,
    clamp_inclusive,
    normal_cdf,
    quantize_activation,
    quantize_k,
    quantize_lifequant,
    quantize_weight,
    quantize_weights,
    standardize,
)
from .splits import (
    IMAGECLEF,
    OFFICE31,
    LifelongFiles,
    LifelongSplit,
    class_incremental_split,
    class_order,
    class_split,
    domain_incremental_split,
    domain_task_indices,
    replay_positions,
    task_indices,
    write_class_incremental,
    write_domain_incremental,
)

__all__ = [
    "METHOD_LABELS", "METHOD_PRESETS", "MODES", "LifelongCriterion", "LifelongMethod", "LifelongResult",
    "LifelongSchedule", "LossMonitor", "MissingData", "SeenTaskEval", "accuracy_matrix_table", "check_expectations",
    "check_experiment", "class_count_table", "compute_importance", "experiment_methods", "identity_at_32_bits",
    "load_domain_data",
    "make_method", "make_schedule", "mean_accuracy_matrix", "method_specs", "pretrain_table", "run_lifelong",
    "run_lifequant", "state_fingerprint", "summary_table", "task0_start",
    "LEARNED_THRESHOLD", "forgetting_minus_bwt", "forgetting_on", "forgetting_per_task", "learned_tasks",
    "ACT_QUANTIZERS", "BALL_FORMS", "DEFAULT_LAMBDA", "IMAGECLEF", "METHODS", "MOBILENET_CIFAR_WEIGHT_STD",
    "NOOP_IN_ORIGINAL", "OFFICE31", "PAIRED_ACTIVATION", "WEIGHT_QUANTIZERS", "BaLLLoss",
    "LifeQuantActivation", "LifeQuantConfig", "LifeQuantWeight", "LifelongFiles", "LifelongSplit", "accuracy_matrix",
    "ball_loss", "ball_scale", "cdf_prox_penalty", "cdf_space", "cdf_space_error", "clamp_inclusive",
    "class_counts",
    "class_incremental_split", "class_order", "class_split", "domain_incremental_split",
    "domain_task_indices", "ewc_importance", "importance", "lifelong_metrics", "mas_importance",
    "method_importance", "normal_cdf", "prox_penalty", "qnoise_loss", "quantize_activation", "quantize_k",
    "quantize_lifequant", "quantize_weight", "quantize_weights", "read_reweight", "replay_positions", "scale_vector",
    "scp_importance", "snapshot", "standardize", "task_indices", "write_class_incremental",
    "write_domain_incremental", "zero_importance",
]
