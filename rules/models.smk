# Tiny random-weight models built locally (no hub access), loaded like real ones.


rule models:
    output:
        [directory(path) for path in L.local_models()],
    params:
        out_dir=lambda w, output: os.path.dirname(output[0]),
        cfg=L.params("models"),
    log:
        "logs/models.log",
    conda:
        "../envs/soraflow.yaml"
    shell:
        "soraflow models --out-dir {params.out_dir} --params {params.cfg:q} > {log} 2>&1"
