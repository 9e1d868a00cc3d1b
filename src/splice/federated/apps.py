"""The apps Flower's deployment engine loads by name (`splice.federated.apps:server`,
`splice.federated.apps:client`): each run carries its config in its run config
(`splice-config`), so one installed splice serves any run."""

from splice.federated.client import client_app
from splice.federated.server import server_app

client = client_app()
server = server_app()
