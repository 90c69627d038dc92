"""ReFT, whole in this folder: `interventions` (LoReFT, NoReFT, DiReFT, the edit positions, the hooks on
the decoder stack, save/load) and `adapter` (ReFT behind the adapter interface)."""
