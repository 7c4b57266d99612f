"""The bundle format's one gate formatter: the export summary line and ``export --list`` rows."""

from gi_deploy.core.bundles import gate_text, gates_line

VERIFICATION = {
    "merge": {"max_abs_logit_diff": 1.23e-6},
    "onnx_fp32": {"max_abs_logit_diff": 4.3e-6, "top1_agreement": 1.0},
    "onnx_fp16": {"max_abs_logit_diff": 2e-3, "top1_agreement": 1.0, "max_abs_prob_diff": 1.2e-4},
    "fp16_emulated": {"max_abs_logit_diff": 3e-3, "top1_agreement": 1.0, "max_abs_prob_diff": 3.1e-4},
    "int8": {"top1_agreement": 0.98, "n": 50, "accuracy_fp32": 0.9, "accuracy_int8": 0.88, "max_abs_prob_diff": 0.1},
    "inputs": {"real_images": 8},
}


def test_the_export_line_names_every_gate_with_its_headline_numbers():
    assert gates_line(VERIFICATION) == (
        "merge max|Δlogit| 1.2e-06; fp32 ONNX max|Δlogit| 4.3e-06, top-1 100%; fp16 top-1 100.0% max|Δprob| "
        "1.2e-04 (true fp16: top-1 100%, max|Δprob| 3.1e-04); int8 top-1 98.0% on 50 val images, accuracy "
        "90.0% -> 88.0%"
    )


def test_list_rows_use_the_same_text_per_gate():
    assert gate_text("onnx_fp16", VERIFICATION["onnx_fp16"]) in gates_line(VERIFICATION)
    assert (
        gate_text("engine", {"top1_agreement": 1.0, "max_abs_prob_diff": 2e-3})
        == "engine top-1 100.0% max|Δprob| 2.0e-03"
    )
