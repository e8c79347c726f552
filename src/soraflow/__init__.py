"""soraflow: the Open-Sora 1.0 recipe as a Snakemake workflow."""
