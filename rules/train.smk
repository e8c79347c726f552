# The three STDiT stages, each from its own training index, then samples of each.


rule dataset:
    input:
        # the score and encode jobs' rejects tables (clips left out of the stage) come with the
        # scored tables and latent caches, so they are not inputs of their own
        tables=L.shard_files("captioned"),
        scores=L.shard_files("scored"),
        matches=L.shard_files("matched"),
        latents=lambda w: [L.latent_cache(w.stage, s) for s in L.shards],
        texts=[L.text_cache(s) for s in L.shards],
        # near-duplicates across the corpus: left out, and in the stage's rejects
        dedup=L.dedup_rejects(),
    output:
        index=L.stage_index(),
        rejects=L.stage_rejects(),
        validation=L.validation_index(),
    log:
        "logs/dataset/{stage}.log",
    conda:
        "../envs/soraflow.yaml"
    params:
        # folders and a count, not every path: 10k shards pass the kernel's argument limit
        # taken from the inputs, not the Layout, so they follow remote storage (snakemake --lint)
        shards_dir=lambda w, input: folder(input.tables, levels=2),
        latent_dir=lambda w, input: folder(input.latents),
        text_dir=lambda w, input: folder(input.texts),
        num_shards=len(L.shards),
        cfg=lambda w: L.params("dataset", w.stage),
    shell:
        "soraflow dataset --shards-dir {params.shards_dir} --num-shards {params.num_shards}"
        " --latent-dir {params.latent_dir} --text-dir {params.text_dir} --stage {wildcards.stage}"
        " --out {output.index} --rejects {output.rejects} --validation {output.validation}"
        " --dedup {input.dedup} --params {params.cfg:q} > {log} 2>&1"


for stage in L.stages:

    rule:
        name:
            f"train_{stage}"
        input:
            index=L.stage_index(stage),
            validation=L.validation_index(stage),
            init=L.init_checkpoint(stage),
            # the Wan family's base weights, where the workflow builds them (the tiny pipeline)
            base=L.base_model(),
        output:
            # final weights are never overwritten by a re-run: remove one deliberately to retrain
            checkpoint=protected(L.checkpoint(stage)),
            loss=L.loss_log(stage),
            validation=L.validation_log(stage),
        log:
            f"logs/train/{stage}.log",
        # a stage longer than the cluster's time limit is a chain of jobs, each resuming the last;
        # a failure a retry would repeat (NaN loss, bad settings) ends the retries at once
        # (--attempt: soraflow.training.failure). Inside a cluster job (remote mode: the Slurm
        # plugin's job step) no retries: a run that stopped ahead of the job's limit ends the job,
        # and the next link is the next job
        retries: 0 if workflow.remote_exec else L.train_job(stage)["retries"]
        conda:
            L.train_environment(workflow.basedir)["conda"]
        threads: 2
        resources:
            # nodes, GPUs per node, CPUs, memory and time from the config (soraflow.workflow.resources),
            # and settings that never change the outputs (resources never re-run a job)
            **{k: v for k, v in L.train_job(stage).items() if k != "retries"},
            operational=L.operational("train", stage),
            # what the sample grids during training draw with (they change no weights)
            sampling=L.all_settings("sample"),
            # the colossalai engine's own environment (a resource, so choosing it re-runs nothing)
            soraflow=L.train_environment(workflow.basedir)["command"],
            attempt=lambda wildcards, attempt: attempt,
        params:
            run_dir=L.run_dir(stage),
            init=" ".join(f"--init {path}" for path in L.init_checkpoint(stage)),
            cfg=L.params("train", stage),
        shell:
            "{resources.soraflow} train {input.index} --out {output.checkpoint} --loss-log {output.loss}"
            " --validation-index {input.validation} --validation-log {output.validation}"
            " --run-dir {params.run_dir} {params.init}"
            " --nproc {resources.processes_per_node} --nodes {resources.nodes} --attempt {resources.attempt}"
            " --params {params.cfg:q} --operational {resources.operational:q}"
            " --sampling {resources.sampling:q} > {log} 2>&1"

    rule:
        name:
            f"sample_{stage}"
        input:
            checkpoint=L.checkpoint(stage),
            index=L.stage_index(stage),
            models=L.model_input(config["vae"].get("model", "")),
        output:
            prompted=[
                report(path, category="Samples", subcategory=stage, caption="../docs/report/samples.rst")
                for path in L.samples(stage)
            ],
            captioned=[
                report(path, category="Samples", subcategory=stage, caption="../docs/report/caption_samples.rst")
                for path in L.caption_samples(stage)
            ],
            comparison=[
                report(path, category="Samples", subcategory=stage, caption="../docs/report/vs_training.rst")
                for path in L.sample_comparison(stage)
            ],
        log:
            f"logs/sample/{stage}.log",
        # a job longer than cluster.max_runtime is a chain of jobs, each resuming the last
        retries: L.step_retries("sample", stage)
        conda:
            "../envs/soraflow.yaml"
        threads: 2
        resources:
            # what the job needs (config), and settings that never change its outputs (resources never re-run a job)
            **L.step_job("sample", stage),
            operational=L.operational("sample"),
        params:
            cfg=L.params("sample"),
        shell:
            "soraflow sample --ckpt {input.checkpoint} --out {output.prompted} --index {input.index}"
            " --from-captions {output.captioned} --comparison {output.comparison} --params {params.cfg:q}"
            " --operational {resources.operational:q} > {log} 2>&1"
