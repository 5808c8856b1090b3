"""Running the pieces: the embedded broker, the worker process, the stack file, drain and the demo."""
