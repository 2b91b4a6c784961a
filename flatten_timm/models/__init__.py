from .flatten_pvt import *
