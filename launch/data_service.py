"""Starts one server of a tf.data service, for ``ranet.train --tf_data_service``.

    python -m launch.data_service dispatcher --port=5050
    python -m launch.data_service worker --dispatcher=HOST:5050 --port=5051

A dispatcher hands out the training job; each worker runs the ImageNet input pipeline
(reading the shards, decoding, augmenting, batching) and streams batches to the trainers.
Workers need the same ``--data_dir`` paths as the trainers and no accelerator; add workers
until the trainers stop waiting for input. The server prints one line once it listens (what
a script can wait for before starting the next) and runs until the process is stopped.
"""

import argparse

import tensorflow as tf


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("dispatcher", "worker"))
    parser.add_argument("--port", type=int, default=5050, help="Port this server listens on.")
    parser.add_argument("--dispatcher", help="worker: the dispatcher's host:port.")
    parser.add_argument("--worker_address", default=None,
                        help="worker: host:port the trainers reach it at (default: its "
                             "hostname and --port).")
    args = parser.parse_args(argv)
    service = tf.data.experimental.service
    if args.role == "dispatcher":
        server = service.DispatchServer(service.DispatcherConfig(port=args.port))
        print(f"tf.data service dispatcher at grpc://<this host>:{args.port}", flush=True)
    else:
        if not args.dispatcher:
            parser.error("a worker needs --dispatcher=HOST:PORT")
        server = service.WorkerServer(service.WorkerConfig(
            dispatcher_address=args.dispatcher, port=args.port,
            worker_address=args.worker_address))
        print(f"tf.data service worker on port {args.port}, dispatcher {args.dispatcher}",
              flush=True)
    server.join()


if __name__ == "__main__":
    main()
