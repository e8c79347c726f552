# Figures for `snakemake --report results/report.html`: dataset, clip gallery, losses, validation.


rule report_figures:
    input:
        clips=L.exports()["table"],
        rejects=L.exports()["rejects"],
        losses=[L.loss_log(stage) for stage in L.stages],
        stage_rejects=[L.stage_rejects(stage) for stage in L.stages],
        validation=[L.validation_log(stage) for stage in L.stages],
    output:
        dataset=report(L.report_figures()["dataset"], category="Dataset", caption="../docs/report/dataset.rst"),
        gallery=report(L.report_figures()["gallery"], category="Dataset", caption="../docs/report/gallery.rst"),
        filters=report(L.report_figures()["filters"], category="Dataset", caption="../docs/report/filters.rst"),
        losses=report(L.report_figures()["losses"], category="Training", caption="../docs/report/losses.rst"),
        validation=report(
            L.report_figures()["validation"],
            category="Training",
            caption="../docs/report/validation.rst",
        ),
    log:
        "logs/report_figures.log",
    conda:
        "../envs/soraflow.yaml"
    resources:
        # operational (the trainers' job logs warn with it too): a change re-runs nothing, and
        # the page says what the value was when it was made
        overfit=config["validation"]["overfit_evaluations"],
    params:
        losses=" ".join(f"{stage}={L.loss_log(stage)}" for stage in L.stages),
        stage_rejects=" ".join(f"{stage}={L.stage_rejects(stage)}" for stage in L.stages),
        # the sample grids lie in the run folders, beside the checkpoints (not declared outputs)
        validation=" ".join(f"{stage}={L.validation_log(stage)}={L.run_dir(stage)}" for stage in L.stages),
        out_dir=lambda w, output: os.path.dirname(output.dataset),
    shell:
        "soraflow report-figures --clips {input.clips} --rejects {input.rejects} --loss {params.losses}"
        " --validation {params.validation} --overfit-evaluations {resources.overfit}"
        " --stage-rejects {params.stage_rejects}"
        " --out-dir {params.out_dir} > {log} 2>&1"
