"""The command-line faces: each parses its arguments and calls the stage functions of `remedis.stages`."""
