"""What every layer leans on and none is about: errors and their one-line
messages (:mod:`.errors`), the console and the error boundary
(:mod:`.console`), writing files atomically (:mod:`.output`), reading and
validating them (:mod:`.validate`), the worker pool (:mod:`.workers`) and
the module names of earlier releases (:mod:`.moved`)."""
