"""Moving KV blocks between engines: the transport seam (`transport.py`) and its implementations."""

from pdserve.kv.transport import KVTransferError, KVTransport, TransferState, make_transport

__all__ = ["KVTransferError", "KVTransport", "TransferState", "make_transport"]
