"""Floor 1, below everything: one-line errors (errors), numeric bounds (limits), strict YAML and
pydantic models (config), command settings -> argparse (settings), run folders and atomic writes
(runfolder). Imports nothing else of nas, and neither torch nor diffusers."""
