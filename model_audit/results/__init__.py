"""The typed results of every command, with their configurations and ``to_dict()`` (the JSON
each command writes).

This layer sits above :mod:`model_audit.core`, :mod:`model_audit.baselines` and the options,
and below :mod:`model_audit.commands` (which computes these results) and
:mod:`model_audit.outputs` (which writes them). :mod:`model_audit.render` renders their JSON
form, so a report can be rendered again from the files alone.
"""
