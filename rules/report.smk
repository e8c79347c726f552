# Figures for `snakemake --report results/report.html`: dataset, clip gallery, losses.


rule report_figures:
    input:
        clips=L.exports()[0],
        rejects=L.exports()[2],
        checkpoints=[L.checkpoint(stage) for stage in L.stages],
    output:
        report(L.report_figures()[0], category="Dataset", caption="../docs/report/dataset.rst"),
        report(L.report_figures()[1], category="Dataset", caption="../docs/report/gallery.rst"),
        report(L.report_figures()[2], category="Training", caption="../docs/report/losses.rst"),
    params:
        losses=" ".join(f"{stage}={L.loss_log(stage)}" for stage in L.stages),
        out_dir=lambda w, output: os.path.dirname(output[0]),
    log:
        "logs/report_figures.log",
    conda:
        "../envs/soraflow.yaml"
    shell:
        "soraflow report-figures --clips {input.clips} --rejects {input.rejects} --loss {params.losses}"
        " --out-dir {params.out_dir} > {log} 2>&1"
