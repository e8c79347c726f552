# Figures for `snakemake --report results/report.html`: dataset, clip gallery, losses.


rule report_figures:
    input:
        clips=L.exports()["table"],
        rejects=L.exports()["rejects"],
        losses=[L.loss_log(stage) for stage in L.stages],
    output:
        dataset=report(L.report_figures()["dataset"], category="Dataset", caption="../docs/report/dataset.rst"),
        gallery=report(L.report_figures()["gallery"], category="Dataset", caption="../docs/report/gallery.rst"),
        losses=report(L.report_figures()["losses"], category="Training", caption="../docs/report/losses.rst"),
    log:
        "logs/report_figures.log",
    conda:
        "../envs/soraflow.yaml"
    params:
        losses=" ".join(f"{stage}={L.loss_log(stage)}" for stage in L.stages),
        out_dir=lambda w, output: os.path.dirname(output.dataset),
    shell:
        "soraflow report-figures --clips {input.clips} --rejects {input.rejects} --loss {params.losses}"
        " --out-dir {params.out_dir} > {log} 2>&1"
