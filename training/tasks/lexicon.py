"""Word-level tasks over fixed lexicons: translate_fr (held in), translate_es (held out), antonym (held in).

The lexicons are small (a few hundred entries), so these tasks set `split_items=False`: train, dev and test
share words and differ only in phrasing (the last two phrasings are test-only). A dev/test score therefore
measures recall of trained words under new phrasings, not generalisation to unseen words.
"""

from __future__ import annotations

import random

from training.tasks.base import Item, Task, normalize

# english | french | spanish  (one common, unambiguous translation each; verbs in the infinitive)
_LEXICON_TEXT = """
dog|chien|perro
cat|chat|gato
house|maison|casa
water|eau|agua
bread|pain|pan
book|livre|libro
tree|arbre|árbol
car|voiture|coche
sun|soleil|sol
moon|lune|luna
star|étoile|estrella
sea|mer|mar
river|rivière|río
mountain|montagne|montaña
city|ville|ciudad
door|porte|puerta
window|fenêtre|ventana
table|table|mesa
chair|chaise|silla
bed|lit|cama
milk|lait|leche
cheese|fromage|queso
apple|pomme|manzana
egg|œuf|huevo
bird|oiseau|pájaro
horse|cheval|caballo
cow|vache|vaca
friend|ami|amigo
mother|mère|madre
father|père|padre
brother|frère|hermano
sister|sœur|hermana
child|enfant|niño
man|homme|hombre
woman|femme|mujer
boy|garçon|chico
girl|fille|chica
king|roi|rey
queen|reine|reina
school|école|escuela
student|étudiant|estudiante
hand|main|mano
head|tête|cabeza
eye|œil|ojo
heart|cœur|corazón
foot|pied|pie
mouth|bouche|boca
nose|nez|nariz
ear|oreille|oreja
arm|bras|brazo
leg|jambe|pierna
tooth|dent|diente
finger|doigt|dedo
knee|genou|rodilla
skin|peau|piel
blood|sang|sangre
bone|os|hueso
day|jour|día
night|nuit|noche
week|semaine|semana
month|mois|mes
morning|matin|mañana
money|argent|dinero
food|nourriture|comida
wine|vin|vino
coffee|café|café
tea|thé|té
sugar|sucre|azúcar
salt|sel|sal
pepper|poivre|pimienta
oil|huile|aceite
honey|miel|miel
butter|beurre|mantequilla
meat|viande|carne
chicken|poulet|pollo
rice|riz|arroz
soup|soupe|sopa
cake|gâteau|pastel
orange|orange|naranja
lemon|citron|limón
strawberry|fraise|fresa
carrot|carotte|zanahoria
onion|oignon|cebolla
tomato|tomate|tomate
banana|banane|plátano
beer|bière|cerveza
flower|fleur|flor
garden|jardin|jardín
street|rue|calle
world|monde|mundo
country|pays|país
word|mot|palabra
name|nom|nombre
color|couleur|color
red|rouge|rojo
blue|bleu|azul
green|vert|verde
black|noir|negro
white|blanc|blanco
yellow|jaune|amarillo
small|petit|pequeño
big|grand|grande
good|bon|bueno
bad|mauvais|malo
new|nouveau|nuevo
old|vieux|viejo
hot|chaud|caliente
cold|froid|frío
happy|heureux|feliz
sad|triste|triste
fast|rapide|rápido
slow|lent|lento
strong|fort|fuerte
weak|faible|débil
rich|riche|rico
poor|pauvre|pobre
young|jeune|joven
easy|facile|fácil
difficult|difficile|difícil
clean|propre|limpio
dirty|sale|sucio
full|plein|lleno
empty|vide|vacío
open|ouvert|abierto
closed|fermé|cerrado
heavy|lourd|pesado
early|tôt|temprano
late|tard|tarde
long|long|largo
short|court|corto
wide|large|ancho
narrow|étroit|estrecho
hard|dur|duro
wet|mouillé|mojado
dry|sec|seco
sweet|sucré|dulce
bitter|amer|amargo
expensive|cher|caro
busy|occupé|ocupado
tired|fatigué|cansado
sick|malade|enfermo
brave|courageux|valiente
funny|drôle|gracioso
proud|fier|orgulloso
lazy|paresseux|perezoso
dangerous|dangereux|peligroso
important|important|importante
famous|célèbre|famoso
false|faux|falso
first|premier|primero
last|dernier|último
different|différent|diferente
together|ensemble|juntos
eat|manger|comer
drink|boire|beber
sleep|dormir|dormir
run|courir|correr
walk|marcher|caminar
speak|parler|hablar
read|lire|leer
write|écrire|escribir
sing|chanter|cantar
dance|danser|bailar
swim|nager|nadar
buy|acheter|comprar
sell|vendre|vender
give|donner|dar
see|voir|ver
love|aimer|amar
want|vouloir|querer
come|venir|venir
go|aller|ir
find|trouver|encontrar
learn|apprendre|aprender
play|jouer|jugar
work|travailler|trabajar
live|vivre|vivir
die|mourir|morir
cook|cuisiner|cocinar
help|aider|ayudar
forget|oublier|olvidar
begin|commencer|empezar
close|fermer|cerrar
think|penser|pensar
answer|répondre|responder
ask|demander|preguntar
travel|voyager|viajar
listen|écouter|escuchar
call|appeler|llamar
pay|payer|pagar
send|envoyer|enviar
win|gagner|ganar
lose|perdre|perder
fly|voler|volar
jump|sauter|saltar
laugh|rire|reír
cry|pleurer|llorar
one|un|uno
two|deux|dos
three|trois|tres
four|quatre|cuatro
five|cinq|cinco
six|six|seis
seven|sept|siete
eight|huit|ocho
nine|neuf|nueve
ten|dix|diez
hundred|cent|cien
thousand|mille|mil
monday|lundi|lunes
tuesday|mardi|martes
wednesday|mercredi|miércoles
thursday|jeudi|jueves
friday|vendredi|viernes
saturday|samedi|sábado
sunday|dimanche|domingo
january|janvier|enero
february|février|febrero
march|mars|marzo
april|avril|abril
june|juin|junio
july|juillet|julio
august|août|agosto
september|septembre|septiembre
october|octobre|octubre
november|novembre|noviembre
december|décembre|diciembre
kitchen|cuisine|cocina
church|église|iglesia
hospital|hôpital|hospital
library|bibliothèque|biblioteca
bank|banque|banco
market|marché|mercado
train|train|tren
boat|bateau|barco
plane|avion|avión
bicycle|vélo|bicicleta
key|clé|llave
paper|papier|papel
phone|téléphone|teléfono
snow|neige|nieve
rain|pluie|lluvia
wind|vent|viento
fire|feu|fuego
sky|ciel|cielo
cloud|nuage|nube
island|île|isla
forest|forêt|bosque
beach|plage|playa
lake|lac|lago
stone|pierre|piedra
gold|or|oro
iron|fer|hierro
spoon|cuillère|cuchara
knife|couteau|cuchillo
fork|fourchette|tenedor
plate|assiette|plato
cup|tasse|taza
bottle|bouteille|botella
shirt|chemise|camisa
shoe|chaussure|zapato
hat|chapeau|sombrero
dress|robe|vestido
coat|manteau|abrigo
pig|cochon|cerdo
sheep|mouton|oveja
mouse|souris|ratón
rabbit|lapin|conejo
bear|ours|oso
wolf|loup|lobo
lion|lion|león
snake|serpent|serpiente
frog|grenouille|rana
bee|abeille|abeja
butterfly|papillon|mariposa
duck|canard|pato
goat|chèvre|cabra
monkey|singe|mono
elephant|éléphant|elefante
spider|araignée|araña
song|chanson|canción
music|musique|música
game|jeu|juego
story|histoire|historia
idea|idée|idea
problem|problème|problema
family|famille|familia
uncle|oncle|tío
aunt|tante|tía
grandmother|grand-mère|abuela
grandfather|grand-père|abuelo
baby|bébé|bebé
neighbor|voisin|vecino
life|vie|vida
death|mort|muerte
war|guerre|guerra
peace|paix|paz
truth|vérité|verdad
summer|été|verano
winter|hiver|invierno
spring|printemps|primavera
autumn|automne|otoño
today|aujourd'hui|hoy
tomorrow|demain|mañana
yesterday|hier|ayer
always|toujours|siempre
never|jamais|nunca
here|ici|aquí
yes|oui|sí
thanks|merci|gracias
hello|bonjour|hola
goodbye|au revoir|adiós
now|maintenant|ahora
very|très|muy
with|avec|con
without|sans|sin
why|pourquoi|por qué
where|où|dónde
north|nord|norte
south|sud|sur
east|est|este
west|ouest|oeste
wall|mur|pared
roof|toit|techo
mirror|miroir|espejo
lamp|lampe|lámpara
box|boîte|caja
bag|sac|bolsa
gift|cadeau|regalo
bridge|pont|puente
castle|château|castillo
farm|ferme|granja
sand|sable|arena
grass|herbe|hierba
leaf|feuille|hoja
"""

LEXICON: tuple[tuple[str, str, str], ...] = tuple(
    tuple(line.split("|")) for line in _LEXICON_TEXT.strip().splitlines()  # type: ignore[misc]
)
EN_FR = {en: fr for en, fr, _ in LEXICON}
EN_ES = {en: es for en, _, es in LEXICON}

# Antonym pairs; every word appears once, so the mapping is the same in both directions.
_ANTONYM_TEXT = """
hot cold, big small, fast slow, happy sad, up down, open closed, early late, rich poor, young old,
strong weak, hard soft, wet dry, clean dirty, full empty, thick thin, wide narrow, deep shallow, high low,
loud quiet, cheap expensive, easy difficult, good bad, right wrong, true false, win lose, begin end,
buy sell, push pull, give take, come go, arrive depart, accept reject, add subtract, remember forget,
love hate, laugh cry, sit stand, friend enemy, war peace, day night, summer winter, north south, east west,
inside outside, above below, before after, first last, front back, top bottom, always never,
everything nothing, everybody nobody, more less, most least, maximum minimum, increase decrease,
include exclude, import export, inhale exhale, input output, internal external, major minor,
majority minority, positive negative, possible impossible, legal illegal, visible invisible,
honest dishonest, polite rude, kind cruel, brave cowardly, generous selfish, wise foolish, clever stupid,
beautiful ugly, safe dangerous, healthy sick, alive dead, awake asleep, sweet sour, smooth rough,
sharp blunt, tight loose, long short, ancient modern, past future, question answer, victory defeat,
success failure, profit loss, attack defend, freeze melt, float sink, borrow lend, teach learn,
shout whisper, create destroy, hide reveal, appear disappear, agree disagree, allow forbid, admit deny,
male female, husband wife, king queen, boy girl, man woman, brother sister, uncle aunt, son daughter,
father mother, nephew niece, host guest, teacher student, employer employee, buyer seller, parent child,
predator prey, winner loser, giant dwarf, hero villain, heaven hell, sunrise sunset, dawn dusk, birth death,
joy sorrow, pleasure pain, comedy tragedy, fact fiction, temporary permanent, optional mandatory,
natural artificial, private public, formal informal, simple complex, rare common, general specific,
absent present, active passive, careful careless, calm anxious, cheerful gloomy, domestic foreign,
boring exciting, entrance exit, interior exterior, junior senior, mature immature, noisy silent,
obey disobey, odd even, offline online, optimist pessimist, order chaos, plural singular, proud humble,
punish reward, raw cooked, regular irregular, rigid flexible, rural urban, strict lenient,
superior inferior, transparent opaque, vertical horizontal, vacant occupied, wild tame, spend save,
send receive, lock unlock, tie untie, pack unpack, connect disconnect, encourage discourage,
inflate deflate, expand contract, ascend descend, rise fall, start finish, guilty innocent, fresh stale,
inner outer, upper lower, forward backward, ahead behind, near far, here there, everywhere nowhere,
yes no, multiply divide, plus minus, credit debit, income expense, heavy light, bright dim
"""

ANTONYM_PAIRS: tuple[tuple[str, str], ...] = tuple(
    tuple(p.split()) for p in _ANTONYM_TEXT.replace("\n", " ").split(",") if p.strip()  # type: ignore[misc]
)
ANTONYMS = {a: b for a, b in ANTONYM_PAIRS} | {b: a for a, b in ANTONYM_PAIRS}


def _fold(text: str) -> str:
    return normalize(text).replace("œ", "oe").replace("’", "'")


def _score_word(prediction: str, answer: str) -> bool:
    got = _fold(prediction)
    want = _fold(answer)
    # Tolerate a leading article ("le chien", "el perro", "to sell").
    for article in ("le ", "la ", "l'", "les ", "un ", "une ", "el ", "los ", "las ", "una ", "to "):
        if got.startswith(article) and not want.startswith(article) and got[len(article):].strip() == want:
            return True
    return got == want


def _lexicon_sampler(mapping: dict[str, str]):
    words = sorted(mapping)

    def sample(rng: random.Random) -> Item:
        word = rng.choice(words)
        return Item(key=word, fields={"word": word}, answer=mapping[word])

    return sample


TRANSLATE_FR = Task(
    name="translate_fr",
    kind="held_in",
    description="Convert an English word to its French translation.",
    phrasings=(
        "Translate '{word}' into French.",
        "What is the French word for {word}?",
        "How do you say {word} in French?",
        "French translation of '{word}'?",
        "Give the French for: {word}",
        "English to French: {word}",
        "Translate this word to French: {word}",
        "In French, '{word}' is what?",
        # test only
        "I'm writing to a pen pal in Paris. Which French word means '{word}'?",
        "Render the English word '{word}' in French.",
    ),
    sampler=_lexicon_sampler(EN_FR),
    scorer=_score_word,
    split_items=False,
)

TRANSLATE_ES = Task(
    name="translate_es",
    kind="held_out",
    description="Convert an English word to its Spanish translation.",
    phrasings=(
        "Translate '{word}' into Spanish.",
        "What is the Spanish word for {word}?",
        "How do you say {word} in Spanish?",
        "Spanish translation of '{word}'?",
        "Give the Spanish for: {word}",
        "English to Spanish: {word}",
        "Translate this word to Spanish: {word}",
        "In Spanish, '{word}' is what?",
        # test only
        "I'm visiting Madrid next week. Which Spanish word means '{word}'?",
        "Render the English word '{word}' in Spanish.",
    ),
    sampler=_lexicon_sampler(EN_ES),
    scorer=_score_word,
    split_items=False,
)

ANTONYM = Task(
    name="antonym",
    kind="held_in",
    description="Convert an English word to its antonym, the word with the opposite meaning.",
    phrasings=(
        "What is the opposite of '{word}'?",
        "Give an antonym for {word}.",
        "Antonym of {word}?",
        "What word means the opposite of {word}?",
        "Opposite: {word}",
        "Name the antonym of '{word}'.",
        "Which word is the opposite of {word}?",
        "Word: {word}. Give its antonym.",
        # test only
        "I'm writing a poem and need the reverse of '{word}'. What word is its opposite?",
        "Flip the meaning of '{word}': what is its antonym?",
    ),
    sampler=_lexicon_sampler(ANTONYMS),
    scorer=_score_word,
    split_items=False,
)
