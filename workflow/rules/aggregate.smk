# Tables over all runs, figures from the tables, captions for `snakemake --report`.

TABLE_NAMES = (
    "runs",
    "scratch",
    "pairwise_grid",
    "ft_size_sweep",
    "pt_size_sweep",
    "strategies",
    "learning_rate",
    "mpt",
    "chains",
)
TABLES = [f"{RESULTS}/tables/{name}.csv" for name in TABLE_NAMES] + [
    f"{RESULTS}/tables/summary.md"
]

# figure -> the study family whose runs it needs (None: always drawn)
FIGURE_FAMILIES = {
    "pairwise_r2": "pairwise",
    "pairwise_mae": "pairwise",
    "r2_vs_ft_size": "pairwise",
    "r2_vs_pt_size": "pt_size_sweep",
    "strategies": "strategies",
    "learning_rate": "learning_rate",
    "learning_curves": None,
    "parity": None,
    "mpt": "mpt",
    "chains": "chains",
    "chain_curves": "chains",
}
FIGURE_STEMS = [
    f"{name}_{config['model']['arch']}"
    for name, family in FIGURE_FAMILIES.items()
    if family is None or FAMILIES[family]
]
FIGURES = [
    f"{RESULTS}/figures/{stem}.{ext}" for stem in FIGURE_STEMS for ext in ("png", "pdf")
]


rule aggregate:
    input:
        METRICS,
    output:
        TABLES,
    log:
        f"{LOGS}/aggregate.log",
    conda:
        ENV
    params:
        config=CONFIG,
        defaults={k: config[k] for k in ("study", "finetune", "datasets")},
    script:
        "../scripts/aggregate.py"


rule figures:
    input:
        TABLES,
    output:
        [
            report(
                f"{RESULTS}/figures/{stem}.png",
                caption=f"../report/{stem.rsplit('_', 1)[0]}.rst",
                category="Figures",
            )
            for stem in FIGURE_STEMS
        ],
        [f"{RESULTS}/figures/{stem}.pdf" for stem in FIGURE_STEMS],
    log:
        f"{LOGS}/figures.log",
    conda:
        ENV
    params:
        config=CONFIG,
        runs=RUNS,
        expect=FIGURE_STEMS,
        datasets=config["datasets"],
    script:
        "../scripts/figures.py"
