"""One thin module per `nas` command: `SETTINGS` (a pydantic model) and `run(settings)`. nas/cli.py
holds the name -> module table; `nas run` lives in nas/pipeline/command.py, above these."""
