"""Reading datasets: dataset cards, the shard catalog and its checks, the head layout, content revisions,
downloads from the Hugging Face Hub, the rule for names that become file paths, and generated demo data.

May import: `plasticity`, `sql`, and modules of this subpackage. Nothing of the warehouse file itself.
"""
