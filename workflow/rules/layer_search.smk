# model.self_cond_layer: auto -> one short training run per candidate block (parallel jobs),
# then the block with the lowest smoothed training loss; the run's training reads the choice.


rule layer_search_run:
    input:
        **latents_inputs(["train"]),
    output:
        summary=f"{LAYER_SEARCH_DIR}/layer{{layer}}/train.json",
        # Only the loss curve is kept: the short run's weights are not reused.
        state=temp(f"{LAYER_SEARCH_DIR}/layer{{layer}}/state.pt"),
    log:
        "logs/layer_search/{run}/s{seed}/layer{layer}.log",
    wildcard_constraints:
        layer=r"\d+",
    threads: job_size("layer_search_run")["cpus"]
    resources:
        **train_resources("layer_search_run"),
    params:
        run_cfg=run_params("layer_search"),
    script:
        "../scripts/layer_search_run.py"


rule choose_layer:
    input:
        layer_search_summaries,
    output:
        choice=f"{LAYER_SEARCH_DIR}/choice.json",
        curves=report(
            f"{LAYER_SEARCH_DIR}/curves.png",
            caption="../report/layer_search.rst",
            category="Layer search",
            subcategory="{run}",
            labels={"run": "{run}", "seed": "{seed}"},
        ),
    log:
        "logs/layer_search/{run}/s{seed}/choose.log",
    threads: job_size("choose_layer")["cpus"]
    resources:
        **job_resources("choose_layer"),
    params:
        run_cfg=run_params("layer_search"),
    script:
        "../scripts/choose_layer.py"
