"""The ``pronghorn`` command line: train, chat, export, doctor."""
