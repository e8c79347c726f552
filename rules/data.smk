# Data: demo videos, manifest shards, download + probe, scene-cut split.


rule demo_videos:
    output:
        L.demo_videos(),
    log:
        "logs/demo_videos.log",
    conda:
        "../envs/soraflow.yaml"
    params:
        cfg=L.params("demo_videos"),
    shell:
        "soraflow demo-videos --params {params.cfg:q} > {log} 2>&1"


# One job per shard, run again only when its rows change: the manifest is ancient() (its
# modification time re-runs nothing) and the job's params hold a digest of its rows, which
# Snakemake compares. One job writing every table would not do: Snakemake deletes a job's
# outputs before running it, so every table would be new and every shard's jobs would run
# again. So appended rows re-run the last shard and the new ones; an edited row, its shard.
rule shard:
    input:
        ancient(L.manifest),
    output:
        L.shard_file("manifest"),
    log:
        "logs/shard/{shard}.log",
    conda:
        "../envs/soraflow.yaml"
    params:
        shard_size=config["data"]["shard_size"],
        rows=lambda w: L.shard_digest(w.shard),
    shell:
        "soraflow shard {input} --shard-size {params.shard_size} --shard {wildcards.shard}"
        " --out {output} > {log} 2>&1"


# Raw files (downloads, hard links, copies under data/raw/) are not declared outputs: Snakemake
# deletes a job's declared outputs before re-running it, and a re-run ingest skips what is
# complete and resumes what is partial. The ingest table names them (raw_path).
# ingest.keep_raw false: the split deletes its shard's raw files once its tables are written,
# and the ingest table is temp(), so Snakemake deletes it then too: nothing re-runs for the
# missing files, and a split that must run again (a split setting changed) runs its ingest
# first, which fetches them again. Switching keep_raw re-runs nothing (the split gets it as a
# resource, which Snakemake never compares).
KEEP_RAW = config["ingest"]["keep_raw"]
DROP_RAW = "" if KEEP_RAW else f"--drop-raw {L.raw_dir()}"


rule ingest:
    input:
        table=L.shard_file("manifest"),
        demo=L.demo_videos(),
    output:
        table=L.shard_file("videos") if KEEP_RAW else temp(L.shard_file("videos")),
        rejects=L.shard_file("rejects_ingest"),
    log:
        "logs/ingest/{shard}.log",
    # a job longer than cluster.max_runtime is a chain of jobs, each resuming the last
    retries: L.step_retries("ingest")
    conda:
        "../envs/soraflow.yaml"
    resources:
        # what the job needs (config), and settings that never change its outputs (resources never re-run a job)
        **L.step_job("ingest"),
        operational=L.operational("ingest"),
    params:
        raw_dir=L.raw_dir(),
        cfg=L.params("ingest"),
    shell:
        "soraflow ingest {input.table} --raw-dir {params.raw_dir} --out {output.table}"
        " --rejects {output.rejects} --params {params.cfg:q} --operational {resources.operational:q} > {log} 2>&1"


rule split:
    input:
        table=L.shard_file("videos"),
    output:
        table=L.shard_file("clips"),
        rejects=L.shard_file("rejects_split"),
        clips=directory(L.clip_dir()),
    log:
        "logs/split/{shard}.log",
    # a job longer than cluster.max_runtime is a chain of jobs, each resuming the last
    retries: L.step_retries("split")
    conda:
        "../envs/soraflow.yaml"
    # videos split at once; each one's ffmpeg and PyAV decoders share them
    threads: config["split"]["threads"]
    resources:
        # what the job needs (config), and settings that never change its outputs (resources never re-run a job)
        **L.step_job("split"),
        operational=L.operational("split"),
        drop_raw=DROP_RAW,
    params:
        cfg=L.params("split"),
    shell:
        "soraflow split {input.table} --clip-dir {output.clips} --out {output.table}"
        " --rejects {output.rejects} --params {params.cfg:q} --operational {resources.operational:q}"
        " --threads {threads} {resources.drop_raw} > {log} 2>&1"


# Scores the stage filters compare; joined at each stage's index, so a scorer change never
# re-cuts or re-captions.
rule score:
    input:
        table=L.shard_file("clips"),
        model=L.model_input(config["score"]["aesthetic_model"]),
    output:
        table=L.shard_file("scored"),
        rejects=L.shard_file("rejects_score"),
    log:
        "logs/score/{shard}.log",
    # a job longer than cluster.max_runtime is a chain of jobs, each resuming the last
    retries: L.step_retries("score")
    conda:
        "../envs/soraflow.yaml"
    resources:
        **L.step_job("score"),
    params:
        cfg=L.params("score"),
    shell:
        "soraflow score {input.table} --out {output.table} --rejects {output.rejects}"
        " --params {params.cfg:q} > {log} 2>&1"


# Near-duplicates across the corpus, from every shard's scored table (their pHashes): one rejects
# table, the clips every stage's index leaves out. It spans all shards, so a new shard re-runs it
# (14 CPU s for a million clips at the default threshold) and the stage indexes; the latent jobs
# do not read it (they encode the few near-duplicates too), so no other shard's job runs again.
rule dedup:
    input:
        tables=L.shard_files("scored"),
    output:
        rejects=L.dedup_rejects(),
    log:
        "logs/dedup.log",
    conda:
        "../envs/soraflow.yaml"
    threads: config["dedup"]["threads"]
    resources:
        operational=L.operational("dedup"),
    params:
        shards_dir=lambda w, input: folder(input.tables, levels=2),
        num_shards=len(L.shards),
        cfg=L.params("dedup"),
    shell:
        "soraflow dedup --shards-dir {params.shards_dir} --num-shards {params.num_shards} --out {output.rejects}"
        " --params {params.cfg:q} --operational {resources.operational:q} > {log} 2>&1"


# After captioning: all shards as one table, Open-Sora 1.0's and 1.1+'s CSVs beside it, every reject in one place.
rule export:
    input:
        # each shard's rejects tables come from the jobs that made its captioned table or the
        # scored tables dedup read, so they are not inputs of their own (4 fewer DAG edges per shard)
        tables=L.shard_files("captioned"),
        # the near-duplicates, which every stage leaves out
        dedup=L.dedup_rejects(),
    output:
        **L.exports(),
    log:
        "logs/export.log",
    conda:
        "../envs/soraflow.yaml"
    params:
        # shard tables are found from the folder and the count: 10k paths would pass the
        # kernel's limit on one command-line argument
        shards_dir=lambda w, input: folder(input.tables, levels=2),
        num_shards=len(L.shards),
    shell:
        "soraflow export --shards-dir {params.shards_dir} --num-shards {params.num_shards}"
        " --out {output.table} --opensora-v1.0-csv {output.opensora_v1_0_csv}"
        " --opensora-v1.1-csv {output.opensora_v1_1_csv} --rejects {output.rejects}"
        " --dedup-rejects {input.dedup} > {log} 2>&1"
