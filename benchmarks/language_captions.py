"""A labelled multilingual caption set for ``benchmarks.language``: alt-text-like captions, written for it.

Sixteen languages, thirty captions each: twenty sentences, then (after a blank line) ten short
captions of two to four words, where detectors differ most. The sentences show the same scenes in
every language, so a difference between languages is the language's, not the scene's. Written by
hand for this benchmark; nothing is downloaded.
"""

# Letters that look like Latin ones (Cyrillic es, Turkish dotless i, a full-width comma) are the point here.
# ruff: noqa: RUF001

from __future__ import annotations

_BLOCKS = {
    "en": """
a red car parked next to a tree
a black and white cat sleeping on a sofa
two children playing football in a park
a bowl of fresh strawberries on a wooden table
the view of snowy mountains from a train window
a woman in a blue dress walking along the beach
close-up of a cup of coffee with latte art
an old wooden bridge over a small river
a group of friends having dinner in a restaurant
a brown dog running through tall grass at sunset
modern kitchen with white cabinets and a large window
a man repairing a bicycle in his garage
colorful hot air balloons floating over a valley
a plate of spaghetti with tomato sauce and basil
a little girl reading a book under a tree
city skyline at night with lights reflected in the water
a pair of running shoes on a white background
fishing boats in the harbour early in the morning
a birthday cake with candles on the kitchen table
a yellow taxi waiting at a traffic light

sunset over the sea
a happy dog
green leather sofa
fresh bread
wedding photo
mountain lake
vintage camera
kids at school
chocolate cake slice
man with umbrella
""",
    "de": """
ein rotes Auto parkt neben einem Baum
eine schwarz-weiße Katze schläft auf dem Sofa
zwei Kinder spielen Fußball im Park
eine Schüssel frische Erdbeeren auf einem Holztisch
Blick auf verschneite Berge aus dem Zugfenster
eine Frau im blauen Kleid spaziert am Strand entlang
Nahaufnahme einer Tasse Kaffee mit Milchschaum
eine alte Holzbrücke über einen kleinen Fluss
eine Gruppe von Freunden beim Abendessen im Restaurant
ein brauner Hund rennt bei Sonnenuntergang durch hohes Gras
moderne Küche mit weißen Schränken und einem großen Fenster
ein Mann repariert ein Fahrrad in seiner Garage
bunte Heißluftballons schweben über einem Tal
ein Teller Spaghetti mit Tomatensoße und Basilikum
ein kleines Mädchen liest ein Buch unter einem Baum
die Skyline der Stadt bei Nacht mit Lichtern im Wasser
ein Paar Laufschuhe vor weißem Hintergrund
Fischerboote im Hafen am frühen Morgen
eine Geburtstagstorte mit Kerzen auf dem Küchentisch
ein gelbes Taxi wartet an der Ampel

Sonnenuntergang am Meer
ein glücklicher Hund
grünes Ledersofa
frisches Brot
Hochzeitsfoto
Bergsee im Sommer
alte Kamera
Kinder in der Schule
Stück Schokoladenkuchen
Mann mit Regenschirm
""",
    "fr": """
une voiture rouge garée à côté d'un arbre
un chat noir et blanc qui dort sur le canapé
deux enfants jouent au football dans un parc
un bol de fraises fraîches sur une table en bois
vue sur les montagnes enneigées depuis la fenêtre du train
une femme en robe bleue se promène sur la plage
gros plan sur une tasse de café crème
un vieux pont en bois au-dessus d'une petite rivière
un groupe d'amis dîne au restaurant
un chien marron court dans les hautes herbes au coucher du soleil
cuisine moderne avec des placards blancs et une grande fenêtre
un homme répare un vélo dans son garage
des montgolfières colorées flottent au-dessus d'une vallée
une assiette de spaghettis à la sauce tomate et au basilic
une petite fille lit un livre sous un arbre
les lumières de la ville la nuit se reflètent dans l'eau
une paire de chaussures de course sur fond blanc
des bateaux de pêche dans le port tôt le matin
un gâteau d'anniversaire avec des bougies sur la table de la cuisine
un taxi jaune attend au feu rouge

coucher de soleil sur la mer
un chien heureux
canapé en cuir vert
pain frais
photo de mariage
lac de montagne
appareil photo ancien
enfants à l'école
part de gâteau au chocolat
homme avec un parapluie
""",
    "es": """
un coche rojo aparcado junto a un árbol
un gato blanco y negro durmiendo en el sofá
dos niños juegan al fútbol en el parque
un cuenco de fresas frescas sobre una mesa de madera
vista de las montañas nevadas desde la ventana del tren
una mujer con un vestido azul pasea por la playa
primer plano de una taza de café con leche
un viejo puente de madera sobre un pequeño río
un grupo de amigos cenando en un restaurante
un perro marrón corre entre la hierba alta al atardecer
cocina moderna con armarios blancos y una ventana grande
un hombre arregla una bicicleta en su garaje
globos aerostáticos de colores sobre un valle
un plato de espaguetis con salsa de tomate y albahaca
una niña pequeña lee un libro debajo de un árbol
la ciudad de noche con las luces reflejadas en el agua
un par de zapatillas de correr sobre fondo blanco
barcos de pesca en el puerto por la mañana temprano
una tarta de cumpleaños con velas en la mesa de la cocina
un taxi amarillo esperando en el semáforo

atardecer en el mar
un perro feliz
sofá de cuero verde
pan recién hecho
foto de boda
lago de montaña
cámara antigua
niños en la escuela
trozo de tarta de chocolate
hombre con paraguas
""",
    "it": """
una macchina rossa parcheggiata vicino a un albero
un gatto bianco e nero che dorme sul divano
due bambini giocano a calcio nel parco
una ciotola di fragole fresche su un tavolo di legno
vista delle montagne innevate dal finestrino del treno
una donna con un vestito blu cammina sulla spiaggia
primo piano di una tazza di cappuccino
un vecchio ponte di legno sopra un piccolo fiume
un gruppo di amici a cena al ristorante
un cane marrone corre nell'erba alta al tramonto
cucina moderna con mobili bianchi e una grande finestra
un uomo ripara una bicicletta nel suo garage
mongolfiere colorate sorvolano una valle
un piatto di spaghetti al pomodoro e basilico
una bambina legge un libro sotto un albero
la città di notte con le luci che si riflettono nell'acqua
un paio di scarpe da corsa su sfondo bianco
barche da pesca nel porto la mattina presto
una torta di compleanno con le candeline sul tavolo della cucina
un taxi giallo fermo al semaforo

tramonto sul mare
un cane felice
divano di pelle verde
pane fresco
foto del matrimonio
lago di montagna
vecchia macchina fotografica
bambini a scuola
fetta di torta al cioccolato
uomo con l'ombrello
""",
    "pt": """
um carro vermelho estacionado ao lado de uma árvore
um gato preto e branco dormindo no sofá
duas crianças jogando futebol no parque
uma tigela de morangos frescos sobre uma mesa de madeira
vista das montanhas cobertas de neve pela janela do trem
uma mulher de vestido azul caminhando na praia
detalhe de uma xícara de café com leite
uma velha ponte de madeira sobre um pequeno rio
um grupo de amigos jantando em um restaurante
um cachorro marrom correndo na grama alta ao pôr do sol
cozinha moderna com armários brancos e uma janela grande
um homem consertando uma bicicleta na garagem
balões de ar quente coloridos sobre um vale
um prato de espaguete com molho de tomate e manjericão
uma menina lendo um livro debaixo de uma árvore
a cidade à noite com as luzes refletidas na água
um par de tênis de corrida em fundo branco
barcos de pesca no porto de manhã cedo
um bolo de aniversário com velas na mesa da cozinha
um táxi amarelo parado no semáforo

pôr do sol no mar
um cachorro feliz
sofá de couro verde
pão fresco
foto de casamento
lago na montanha
câmera antiga
crianças na escola
fatia de bolo de chocolate
homem com guarda-chuva
""",
    "nl": """
een rode auto geparkeerd naast een boom
een zwart-witte kat slaapt op de bank
twee kinderen spelen voetbal in het park
een kom verse aardbeien op een houten tafel
uitzicht op besneeuwde bergen vanuit het treinraam
een vrouw in een blauwe jurk wandelt langs het strand
een kopje koffie met melkschuim van dichtbij
een oude houten brug over een kleine rivier
een groep vrienden eet samen in een restaurant
een bruine hond rent door het hoge gras bij zonsondergang
moderne keuken met witte kasten en een groot raam
een man repareert een fiets in zijn garage
kleurrijke luchtballonnen boven een vallei
een bord spaghetti met tomatensaus en basilicum
een klein meisje leest een boek onder een boom
de stad bij nacht met lichtjes die weerspiegelen in het water
een paar hardloopschoenen op een witte achtergrond
vissersboten in de haven vroeg in de ochtend
een verjaardagstaart met kaarsjes op de keukentafel
een gele taxi wacht bij het stoplicht

zonsondergang boven zee
een blije hond
groene leren bank
vers brood
trouwfoto
meer in de bergen
oude camera
kinderen op school
stuk chocoladetaart
man met paraplu
""",
    "sv": """
en röd bil parkerad bredvid ett träd
en svartvit katt som sover i soffan
två barn spelar fotboll i parken
en skål med färska jordgubbar på ett träbord
utsikt över snöklädda berg från tågfönstret
en kvinna i blå klänning promenerar längs stranden
närbild på en kopp kaffe med mjölkskum
en gammal träbro över en liten å
en grupp vänner äter middag på en restaurang
en brun hund springer genom högt gräs i solnedgången
modernt kök med vita skåp och ett stort fönster
en man lagar en cykel i sitt garage
färgglada luftballonger svävar över en dal
en tallrik spagetti med tomatsås och basilika
en liten flicka läser en bok under ett träd
staden på natten med ljusen som speglas i vattnet
ett par löparskor mot vit bakgrund
fiskebåtar i hamnen tidigt på morgonen
en födelsedagstårta med ljus på köksbordet
en gul taxi väntar vid trafikljuset

solnedgång över havet
en glad hund
grön skinnsoffa
nybakat bröd
bröllopsbild
fjällsjö
gammal kamera
barn i skolan
bit chokladtårta
man med paraply
""",
    "pl": """
czerwony samochód zaparkowany obok drzewa
czarno-biały kot śpi na kanapie
dwoje dzieci gra w piłkę nożną w parku
miska świeżych truskawek na drewnianym stole
widok na ośnieżone góry z okna pociągu
kobieta w niebieskiej sukience spaceruje po plaży
zbliżenie filiżanki kawy z mlekiem
stary drewniany most nad małą rzeką
grupa przyjaciół je kolację w restauracji
brązowy pies biegnie przez wysoką trawę o zachodzie słońca
nowoczesna kuchnia z białymi szafkami i dużym oknem
mężczyzna naprawia rower w swoim garażu
kolorowe balony na ogrzane powietrze nad doliną
talerz spaghetti z sosem pomidorowym i bazylią
mała dziewczynka czyta książkę pod drzewem
miasto nocą ze światłami odbijającymi się w wodzie
para butów do biegania na białym tle
łodzie rybackie w porcie wczesnym rankiem
tort urodzinowy ze świeczkami na kuchennym stole
żółta taksówka czeka na światłach

zachód słońca nad morzem
szczęśliwy pies
zielona skórzana kanapa
świeży chleb
zdjęcie ślubne
jezioro w górach
stary aparat
dzieci w szkole
kawałek tortu czekoladowego
mężczyzna z parasolem
""",
    "cs": """
červené auto zaparkované vedle stromu
černobílá kočka spí na gauči
dvě děti hrají fotbal v parku
miska čerstvých jahod na dřevěném stole
výhled na zasněžené hory z okna vlaku
žena v modrých šatech se prochází po pláži
detail šálku kávy s mléčnou pěnou
starý dřevěný most přes malou řeku
skupina přátel večeří v restauraci
hnědý pes běží vysokou trávou při západu slunce
moderní kuchyně s bílými skříňkami a velkým oknem
muž opravuje kolo ve své garáži
barevné horkovzdušné balóny nad údolím
talíř špaget s rajčatovou omáčkou a bazalkou
malá holčička čte knihu pod stromem
město v noci se světly odrážejícími se ve vodě
pár běžeckých bot na bílém pozadí
rybářské lodě v přístavu brzy ráno
narozeninový dort se svíčkami na kuchyňském stole
žluté taxi čeká na semaforu

západ slunce nad mořem
šťastný pes
zelená kožená pohovka
čerstvý chléb
svatební fotka
horské jezero
starý fotoaparát
děti ve škole
kousek čokoládového dortu
muž s deštníkem
""",
    "ru": """
красная машина припаркована рядом с деревом
чёрно-белый кот спит на диване
двое детей играют в футбол в парке
миска свежей клубники на деревянном столе
вид на заснеженные горы из окна поезда
женщина в синем платье гуляет по пляжу
чашка кофе с молочной пенкой крупным планом
старый деревянный мост через небольшую речку
компания друзей ужинает в ресторане
коричневая собака бежит по высокой траве на закате
современная кухня с белыми шкафами и большим окном
мужчина чинит велосипед в своём гараже
разноцветные воздушные шары над долиной
тарелка спагетти с томатным соусом и базиликом
маленькая девочка читает книгу под деревом
ночной город с огнями, отражающимися в воде
пара беговых кроссовок на белом фоне
рыбацкие лодки в порту рано утром
праздничный торт со свечами на кухонном столе
жёлтое такси ждёт на светофоре

закат над морем
счастливая собака
зелёный кожаный диван
свежий хлеб
свадебное фото
горное озеро
старый фотоаппарат
дети в школе
кусок шоколадного торта
мужчина с зонтом
""",
    "uk": """
червона машина припаркована біля дерева
чорно-білий кіт спить на дивані
двоє дітей грають у футбол у парку
миска свіжої полуниці на дерев'яному столі
вид на засніжені гори з вікна потяга
жінка в синій сукні гуляє пляжем
чашка кави з молочною пінкою зблизька
старий дерев'яний міст через невелику річку
компанія друзів вечеряє в ресторані
коричневий собака біжить високою травою на заході сонця
сучасна кухня з білими шафами та великим вікном
чоловік ремонтує велосипед у своєму гаражі
різнокольорові повітряні кулі над долиною
тарілка спагеті з томатним соусом і базиліком
маленька дівчинка читає книжку під деревом
нічне місто з вогнями, що відбиваються у воді
пара бігових кросівок на білому тлі
рибальські човни в порту рано вранці
святковий торт зі свічками на кухонному столі
жовте таксі чекає на світлофорі

захід сонця над морем
щасливий пес
зелений шкіряний диван
свіжий хліб
весільне фото
гірське озеро
старий фотоапарат
діти в школі
шматок шоколадного торта
чоловік з парасолькою
""",
    "tr": """
bir ağacın yanına park edilmiş kırmızı bir araba
kanepede uyuyan siyah beyaz bir kedi
parkta futbol oynayan iki çocuk
ahşap bir masanın üzerinde bir kase taze çilek
tren penceresinden karlı dağların manzarası
mavi elbiseli bir kadın sahilde yürüyor
köpüklü bir fincan kahvenin yakın çekimi
küçük bir nehrin üzerindeki eski ahşap köprü
bir restoranda akşam yemeği yiyen bir grup arkadaş
gün batımında uzun otların arasında koşan kahverengi bir köpek
beyaz dolaplı ve büyük pencereli modern bir mutfak
garajında bisiklet tamir eden bir adam
bir vadinin üzerinde süzülen rengarenk sıcak hava balonları
domates soslu ve fesleğenli bir tabak spagetti
bir ağacın altında kitap okuyan küçük bir kız
ışıkları suya yansıyan gece şehir manzarası
beyaz arka plan üzerinde bir çift koşu ayakkabısı
sabahın erken saatlerinde limandaki balıkçı tekneleri
mutfak masasında mumlu bir doğum günü pastası
trafik ışığında bekleyen sarı bir taksi

denizde gün batımı
mutlu bir köpek
yeşil deri kanepe
taze ekmek
düğün fotoğrafı
dağ gölü
eski fotoğraf makinesi
okulda çocuklar
bir dilim çikolatalı pasta
şemsiyeli adam
""",
    "ar": """
سيارة حمراء متوقفة بجانب شجرة
قطة سوداء وبيضاء نائمة على الأريكة
طفلان يلعبان كرة القدم في الحديقة
وعاء من الفراولة الطازجة على طاولة خشبية
منظر الجبال المغطاة بالثلوج من نافذة القطار
امرأة ترتدي فستانا أزرق تمشي على الشاطئ
صورة مقربة لفنجان قهوة بالحليب
جسر خشبي قديم فوق نهر صغير
مجموعة من الأصدقاء يتناولون العشاء في مطعم
كلب بني يركض في العشب الطويل عند غروب الشمس
مطبخ حديث بخزائن بيضاء ونافذة كبيرة
رجل يصلح دراجة في المرآب
مناطيد ملونة تحلق فوق الوادي
طبق من السباغيتي بصلصة الطماطم والريحان
فتاة صغيرة تقرأ كتابا تحت شجرة
المدينة ليلا مع انعكاس الأضواء على الماء
زوج من أحذية الجري على خلفية بيضاء
قوارب الصيد في الميناء في الصباح الباكر
كعكة عيد ميلاد بالشموع على طاولة المطبخ
سيارة أجرة صفراء تنتظر عند إشارة المرور

غروب الشمس على البحر
كلب سعيد
أريكة جلدية خضراء
خبز طازج
صورة زفاف
بحيرة جبلية
كاميرا قديمة
أطفال في المدرسة
قطعة كعكة شوكولاتة
رجل يحمل مظلة
""",
    "zh": """
一辆红色汽车停在树旁
一只黑白相间的猫在沙发上睡觉
两个孩子在公园里踢足球
木桌上放着一碗新鲜的草莓
从火车窗外看到的雪山
穿蓝色连衣裙的女人在海滩上散步
一杯拿铁咖啡的特写
小河上的一座旧木桥
一群朋友在餐厅吃晚饭
夕阳下一只棕色的狗在高高的草丛中奔跑
白色橱柜和大窗户的现代厨房
一个男人在车库里修自行车
彩色热气球飘在山谷上空
一盘番茄罗勒意大利面
小女孩在树下看书
城市夜景，灯光倒映在水中
白色背景上的一双跑鞋
清晨港口里的渔船
厨房桌子上插着蜡烛的生日蛋糕
红绿灯前等待的黄色出租车

海上日落
快乐的小狗
绿色皮沙发
新鲜面包
婚纱照
山间湖泊
老式相机
学校里的孩子
一块巧克力蛋糕
打伞的男人
""",
    "ja": """
木の横に停められた赤い車
ソファで眠る白黒の猫
公園でサッカーをする二人の子供
木のテーブルの上にある新鮮なイチゴの入ったボウル
電車の窓から見える雪山
青いワンピースを着て海辺を歩く女性
ラテアートのコーヒーカップのクローズアップ
小さな川にかかる古い木の橋
レストランで夕食を楽しむ友人たち
夕日の中、草むらを走る茶色い犬
白い戸棚と大きな窓のあるモダンなキッチン
ガレージで自転車を修理する男性
谷の上に浮かぶカラフルな熱気球
トマトソースとバジルのスパゲッティ
木の下で本を読む女の子
水面に明かりが映る夜の街
白い背景に置かれたランニングシューズ
早朝の港に停泊する漁船
キッチンのテーブルに置かれたろうそく付きの誕生日ケーキ
信号待ちをしている黄色いタクシー

海に沈む夕日
嬉しそうな犬
緑の革のソファ
焼きたてのパン
結婚式の写真
山の湖
古いカメラ
学校の子供たち
チョコレートケーキ
傘をさす男性
""",
}

LANGUAGES = tuple(_BLOCKS)


def _split(block: str) -> tuple[list[str], list[str]]:
    sentences, short = block.strip().split("\n\n")
    return sentences.splitlines(), short.splitlines()


CAPTIONS: list[tuple[str, str]] = [
    (code, text) for code in LANGUAGES for part in _split(_BLOCKS[code]) for text in part
]
"""(ISO 639-1 code, caption), language by language, in a fixed order."""

SHORT: frozenset[tuple[str, str]] = frozenset((code, text) for code in LANGUAGES for text in _split(_BLOCKS[code])[1])
"""The two-to-four-word captions among ``CAPTIONS``."""
