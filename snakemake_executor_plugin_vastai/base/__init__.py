"""What every room shares and nothing of ours below it: the error family, the logger, secret
redaction, and the progress lines a person watching the run reads."""
