"""Settings: the run configuration (`config`) and the declarations of options that a config file
and the command line share (`options`: type, default, accepted values, help).

May import: `plasticity`, `warehouse.sources`, and modules of this subpackage.
"""
