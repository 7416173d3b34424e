"""The live-deployment harness of the tests and benchmarks: start a deployment (a `pdserve serve` subprocess,
a deployment in this process's Ray, or the HTTP app on an in-process engine), wait until it is ready, hand out
its URLs, inject faults, and stop everything it started. The load itself is `pdserve.load`.

    ports      free ports (one, or a run of n)
    poll       wait for a predicate (blocking and async)
    server     `pdserve serve` as a subprocess in its own session, stopped by its session id
    inprocess  a deployment in this process's Ray (optionally with a local Prometheus it scrapes)
    thread     the HTTP app served by uvicorn in a thread, over an in-process engine client
    faults     SIGKILL / SIGSTOP of workers, frontends and the controller; failed transfers; scale-ins; ...
"""
