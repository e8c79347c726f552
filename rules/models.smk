# Tiny random-weight models built locally (no hub access), loaded like real ones.


rule models:
    output:
        **{name: directory(path) for name, path in L.local_models().items()},
    params:
        out_dir=lambda w, output: folder(output),
        cfg=L.params("models"),
    log:
        "logs/models.log",
    conda:
        "../envs/soraflow.yaml"
    shell:
        "soraflow models --out-dir {params.out_dir} --params {params.cfg:q} > {log} 2>&1"
