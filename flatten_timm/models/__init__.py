from .flatten_pvt import *
from .flatten_pvt_v2 import *
from .flatten_swin import *
from .flatten_cswin import *
from .flatten_deit import *
