"""splitserve on a Ray cluster: each worker of a pool is a Ray actor that supervises one unchanged
`splitserve worker` process, which joins the deployment through the router like any other worker.

`cli` (the flags), `resources` (pool resource specs) and `scale_client` (`splitserve scale`) do not
import ray; the rest does, and is imported only by `serve --ray`. So `splitserve --help` and the
single-machine path never load it.
"""
