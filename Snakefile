# soraflow: the Open-Sora 1.0 recipe as one workflow.
#   snakemake -n                      the whole DAG, nothing run
#   snakemake --profile profiles/local
#   snakemake --profile profiles/slurm
# Settings live in workflow_config.yaml (checked against the schema below before any job).

from snakemake.utils import min_version, validate

min_version("8.0")


# The defaults sit beside this file, so --directory and --configfile overrides work anywhere.
configfile: f"{workflow.basedir}/workflow_config.yaml"


from soraflow.workflow.settings import stages_as_listed

stages_as_listed(config, workflow.overwrite_configfiles, workflow.config_settings.config)
validate(config, "src/soraflow/workflow/schemas/config.schema.yaml")

from soraflow.workflow.layout import Layout, folder, use_running_environment

use_running_environment()
L = Layout(config)


wildcard_constraints:
    shard=r"\d{5}",
    stage="|".join(L.stages),


# Before any job is submitted (never in a dry run): the plan's tables and every job's runtime and
# memory (soraflow plan prints the same), and a stop naming any stage or model that does not fit
# the planned GPU (plan.gpu).
onstart:
    from soraflow.workflow.resources import check

    print(check(config))


include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/caption.smk"
include: "rules/encode.smk"
include: "rules/train.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        L.all_samples(),
        L.exports().values(),
        L.report_figures().values(),
