"""Coverage-guided fuzzing (atheris) of every `*_untrusted` entry point and the signalling
server core: targets in `fuzz.targets`, the campaign runner in `fuzz.run` (`make fuzz`)."""
