# Captioning: a transformers LLaVA sees several frames of every clip.


rule caption:
    input:
        table=L.shard_file("clips"),
        model=L.model_input(config["caption"]["model"]),
    output:
        table=L.shard_file("captioned"),
        rejects=L.shard_file("rejects_caption"),
    log:
        "logs/caption/{shard}.log",
    # a job longer than cluster.max_runtime is a chain of jobs, each resuming the last
    retries: L.step_retries("caption")
    conda:
        "../envs/soraflow.yaml"
    # torch steps use two threads; the scheduler keeps them from sharing cores
    threads: 2
    resources:
        # what the job needs (config), and settings that never change its outputs (resources never re-run a job)
        **L.step_job("caption"),
        operational=L.operational("caption"),
    params:
        cfg=L.params("caption"),
    shell:
        "soraflow caption {input.table} --out {output.table} --rejects {output.rejects}"
        " --params {params.cfg:q} --operational {resources.operational:q} > {log} 2>&1"


# Caption-video match needs the caption, so it is scored after captioning, apart from the score
# step: a caption change re-scores only this, and a scorer change never re-captions.
rule match:
    input:
        table=L.shard_file("captioned"),
        model=L.model_input(config["score"]["match"]["model"]),
    output:
        table=L.shard_file("matched"),
    log:
        "logs/match/{shard}.log",
    # a job longer than cluster.max_runtime is a chain of jobs, each resuming the last
    retries: L.step_retries("match")
    conda:
        "../envs/soraflow.yaml"
    # torch steps use two threads; the scheduler keeps them from sharing cores
    threads: 2
    resources:
        **L.step_job("match"),
    params:
        cfg=L.params("match"),
    shell:
        "soraflow match {input.table} --out {output.table} --params {params.cfg:q} > {log} 2>&1"
