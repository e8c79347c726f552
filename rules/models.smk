# Tiny random-weight models built locally (no hub access), loaded like real ones.


rule models:
    output:
        **{name: directory(path) for name, path in L.local_models().items()},
    log:
        "logs/models.log",
    conda:
        "../envs/soraflow.yaml"
    params:
        out_dir=lambda w, output: folder(output),
        cfg=L.params("models"),
    shell:
        "soraflow models --out-dir {params.out_dir} --params {params.cfg:q} > {log} 2>&1"


# The Wan family's tiny random-weight pipeline, built only when the config names it.
rule wan_model:
    output:
        directory(L.tiny_wan()),
    log:
        "logs/wan_model.log",
    conda:
        "../envs/soraflow.yaml"
    shell:
        "soraflow tiny-wan --out {output} > {log} 2>&1"
