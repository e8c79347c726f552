# Cached model inputs: VAE latents per stage (frames and size differ) and text features per shard.


# A stage's latents: only the clips its filters keep (the scored table has every clip with the
# scores the filters compare); a filter change re-runs this job, which then encodes only the
# clips missing from the shard's chunks (keyed per clip), never the whole shard again.
rule encode_video:
    input:
        table=L.shard_file("scored"),
        model=L.model_input(config["vae"].get("model", "")),
    output:
        cache=L.latent_cache(),
        # clips too short for the stage's frames, or whose files do not decode
        rejects=L.shard_file("rejects_encode_video_{stage}"),
    log:
        "logs/encode_video/{stage}/{shard}.log",
    # a job longer than cluster.max_runtime is a chain of jobs, each resuming the last
    retries: L.step_retries("encode_video")
    conda:
        "../envs/soraflow.yaml"
    # torch steps use two threads; the scheduler keeps them from sharing cores
    threads: 2
    resources:
        # what the job needs (config), and settings that never change its outputs (resources never re-run a job)
        **L.step_job("encode_video"),
        operational=L.operational("encode_video"),
    params:
        cfg=lambda w: L.params("encode_video", w.stage),
    shell:
        "soraflow encode-video {input.table} --out {output.cache} --rejects {output.rejects}"
        " --params {params.cfg:q} --operational {resources.operational:q} > {log} 2>&1"


rule encode_text:
    input:
        table=L.shard_file("captioned"),
        model=L.model_input(config["text_encoder"]["model"]),
    output:
        L.text_cache(),
    log:
        "logs/encode_text/{shard}.log",
    # a job longer than cluster.max_runtime is a chain of jobs, each resuming the last
    retries: L.step_retries("encode_text")
    conda:
        "../envs/soraflow.yaml"
    # torch steps use two threads; the scheduler keeps them from sharing cores
    threads: 2
    resources:
        **L.step_job("encode_text"),
    params:
        cfg=L.params("encode_text"),
    shell:
        "soraflow encode-text {input.table} --out {output} --params {params.cfg:q} > {log} 2>&1"
